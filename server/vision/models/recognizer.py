"""ArcFace-style recognizers (w600k_mbf 512-d, MobileFaceNet 128-d): aligned crop -> unit embedding."""

from __future__ import annotations

import numpy as np

from server.vision.models.batching import MicroBatcher
from server.vision.models.runtime import padded_rows, row_counts


class ArcFaceRecognizer:
    """Embeds ArcFace-aligned 112x112 BGR crops; batch-capable unless `max_batch` is 1.

    With `flip=True` the embedding is the normalised mean of the face's and
    its mirror image's embeddings (test-time augmentation).
    """

    def __init__(
        self,
        session,
        name: str,
        embedding_dim: int,
        match_threshold: float,
        max_batch: int = 32,
        flip: bool = False,
        search_threshold: float | None = None,
        micro_batch: bool = False,
    ):
        self.session = session
        self.name = name
        self.embedding_dim = embedding_dim
        self.match_threshold = match_threshold  # 1:1, calibrated at FAR 1e-3 per pair
        # 1:N: a probe meets every gallery face, so its false-match odds grow with the gallery;
        # calibrated at FAR 1e-4 per pair (see scripts/eval_verification.py)
        self.search_threshold = search_threshold if search_threshold is not None else match_threshold
        self.max_batch = max_batch
        self.flip = flip
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        # concurrent requests' faces share one session.run (see server/vision/models/batching.py)
        self.batcher = MicroBatcher(self._run, max_batch) if micro_batch and max_batch > 1 else None

    @property
    def model_id(self) -> str:
        """Identifies the embedding space; embeddings with different ids do not compare."""
        return f"{self.name}{'+flip' if self.flip else ''}"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        outs = []
        for i in range(0, len(batch), self.max_batch):
            chunk = batch[i : i + self.max_batch]
            padded = padded_rows(self.session, chunk, self.max_batch)
            outs.append(self.session.run([self.output_name], {self.input_name: padded})[0][: len(chunk)])
        return np.concatenate(outs, axis=0)

    def warm_up(self) -> None:
        """One run per batch shape the runtime keeps to (runtime.row_counts; one face elsewhere)."""
        for rows in row_counts(self.session, self.max_batch):
            self._run(np.zeros((rows, 3, 112, 112), np.float32))

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """crops: 112x112x3 BGR uint8 arrays -> [N, dim] float32 L2-normalised."""
        if not crops:
            return np.zeros((0, self.embedding_dim), np.float32)
        x = np.stack(crops)[:, :, :, ::-1].astype(np.float32)  # BGR -> RGB
        x = (x - 127.5) / 127.5
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        run = self.batcher or self._run
        if self.flip:
            both = run(np.concatenate([x, x[:, :, :, ::-1]], axis=0))
            emb = both[: len(crops)] + both[len(crops) :]
        else:
            emb = run(x)
        emb = emb.astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
        return emb
