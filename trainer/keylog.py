"""--log-keys: an audit of which samples each optimizer step trained on, one file per rank.

OUT/keys/rank-R.tsv holds `epoch <tab> step <tab> key,key,...` per batch: what was drawn, so with --sampling
other than uniform a key appears once per draw of it (two crops of one image: twice). A resumed run first drops
the lines after its checkpoint's step (those batches were trained on by the killed run, then undone
by restoring the checkpoint), so the file always describes the weights that exist.
"""

from __future__ import annotations

from pathlib import Path


class KeyLog:
    def __init__(self, out: Path, rank: int, resume_step: int | None) -> None:
        self.path = out / "keys" / f"rank-{rank}.tsv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if int(line.split("\t")[1]) <= resume_step]
        self.path.write_text("".join(kept), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, epoch: int, step: int, keys: list[str]) -> None:
        self.file.write(f"{epoch}\t{step}\t{','.join(keys)}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_keys(path: Path) -> dict[int, list[str]]:
    """{epoch: keys in training order} from a rank's key log."""
    epochs: dict[int, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        epoch, _, keys = line.split("\t")
        epochs.setdefault(int(epoch), []).extend(k for k in keys.split(",") if k)
    return epochs
