"""Re-embed stored faces from their encrypted crops, e.g. after switching the recognizer.

Faces are stored with the model id of the recognizer that embedded them;
Verify (and Search) skip faces of another model. With a crop key configured
the server keeps an AES-GCM sealed, aligned 112x112 crop of every registered
face, and this script turns those crops into embeddings of the current
recognizer (FACESVC_RECOGNIZER) without the original photos.

    FACESVC_CROP_KEY=... FACESVC_DB_URL=mysql://... facesvc-reembed           # stale faces only
    ... facesvc-reembed --all        # every face with a crop
    ... facesvc-reembed --check      # write nothing: compare fresh embeddings with the stored ones

(`facesvc-reembed` is installed with the server, and in the Docker image; `python -m server.reembed` is the same.)

Settings (model dir, recognizer, database, key) come from the same FACESVC_*
environment as the server. Faces without a crop cannot be re-embedded; they
are counted and must be enrolled again.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

from server import config
from server.assembly import model_loader
from server.storage.crypto import CropCipher
from server.storage.sql import open_store


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db-url", help="overrides FACESVC_DB_URL")
    ap.add_argument("--collection", default="", help="only this collection")
    ap.add_argument("--all", action="store_true", help="re-embed every face with a crop, not only other models' faces")
    ap.add_argument("--check", action="store_true", help="write nothing; report how close fresh embeddings are to the stored")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = config.load([], os.environ)
    if not settings.crop_key:
        print("FACESVC_CROP_KEY is not set: without it no crops were stored and none can be opened", file=sys.stderr)
        return 2
    cipher = CropCipher(settings.crop_key)
    store = open_store(args.db_url if args.db_url is not None else settings.db_url, settings.data_dir)
    recognizer = model_loader(settings).build(settings.recognizer, "recognizer", flip=settings.recognizer_flip)
    checked = updated = unreadable = 0
    cosines: list[float] = []
    after = ""
    while True:
        faces = store.faces_with_crops(after, args.batch, args.collection)
        if not faces:
            break
        after = faces[-1].face_id
        todo = faces if (args.all or args.check) else [f for f in faces if f.model_id != recognizer.model_id]
        if not todo:
            continue
        opened = []
        for f in todo:
            try:
                opened.append((f, cipher.open(f.crop, f.face_id)))
            except ValueError as exc:  # sealed under another key, or damaged: the others go on
                print(f"face {f.face_id}: crop not opened, left as it is: {exc}", file=sys.stderr)
                unreadable += 1
        if not opened:
            continue
        todo = [f for f, _ in opened]
        fresh = recognizer.embed([crop for _, crop in opened])
        for f, e in zip(todo, fresh):
            checked += 1
            if f.model_id == recognizer.model_id:
                cosines.append(float(np.dot(f.embedding, e)))
            if not args.check:
                store.update_embedding(f.face_id, recognizer.model_id, e)
                updated += 1
    store.close()
    print(f"recognizer: {recognizer.model_id}")
    print(f"faces checked: {checked}")
    print(f"re-embedded: {updated}")
    if unreadable:
        print(f"crops not opened (another crop key, or damaged; those faces keep their embeddings): {unreadable}")
    if cosines:
        print(f"min cosine to stored: {min(cosines):.4f} (same model, {len(cosines)} faces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
