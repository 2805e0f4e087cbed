"""trainer serve: the "upload a picture, get its category" service (app.py) and its page (static/)."""
