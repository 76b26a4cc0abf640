"""Sharded, atomic, auto-resumed checkpoints.

Layout under `checkpoint.dir` (default RUN_DIR/checkpoints):

    step_00000100/              a published checkpoint
      engine/                   the engine's sharded state (DCP for DDP, DeepSpeed's own format)
      rank_00000.json ...       per rank: data-pipeline state and RNG states
      trainer.json              counters, format version, versions, world size, model fingerprint
      config.yaml               the resolved run config
      manifest.json             every file above with its size and checksum (xxh3_128)
      COMPLETE                  the completion marker, written after the manifest
    latest                      name of the newest published checkpoint, updated last
    .tmp-step_00000200/         a save in progress (or one that died): never chosen

Publishing: every rank writes its own part into the temporary directory; after all ranks are
done, the files are hashed in parallel (each rank a share of the bytes; during an async save in
the background, not on the training thread), rank 0 writes the manifest and the marker, renames
the directory to its final name (atomic on one filesystem) and then replaces `latest`. Any
failure on any rank makes every rank raise `CheckpointSaveError`; published checkpoints are
never touched, so the previous one stays intact.

Resume (`checkpoint.resume: auto`): the newest checkpoint whose marker, manifest, sizes and
checksums all check out, verified by all ranks together (each a share of the files); newer
ones that do not are reported with the reason.

Checksums: xxh3_128 (format 2, recorded as the manifest's "hash"); a manifest without "hash"
(format 1) holds sha256 checksums and is still read. The marker is always the sha256 of the
manifest (a few KB).
"""
