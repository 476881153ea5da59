"""The child processes of ``fedge bench aggregator`` (:mod:`sdk.bench.aggregator_bench`): one script per path.

Each runs in a fresh interpreter, reads the pre-sealed updates one at a time
from one file (as they would arrive from the broker), and prints one JSON line.
Kept as source text so every path starts from the same clean process.
"""

from __future__ import annotations

import textwrap

_PRELUDE = textwrap.dedent(
    """
    import hashlib, json, sys, time
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from device_agent.protocol.envelope import open_update
    from device_agent.protocol.tensor_codec import DecodeLimits
    from device_agent.protocol.validation import UpdateValidator
    from sdk.bench.process_memory import status_mb
    cfg = json.loads(sys.argv[1])
    def seed(label):
        return hashlib.sha256(f"fedge-bench:{label}".encode()).digest()
    spec = {name: (tuple(shape), "float32") for name, shape in cfg["spec"].items()}
    devices = {d: Ed25519PrivateKey.from_private_bytes(seed("ed25519:" + d)).public_key() for d in cfg["devices"]}
    region_key = X25519PrivateKey.from_private_bytes(seed("x25519:" + cfg["region"]))
    index = cfg["index"]
    mine = [i for i in range(len(index)) if i % cfg.get("members", 1) == cfg.get("share", 0)]
    blobs = open(cfg["blobs"], "rb")
    def next_blob(i):
        blobs.seek(index[i][0])
        return blobs.read(index[i][1])
    rss_before_mb = status_mb("VmRSS")
    def report(mean, loop_s, finish_s, **extra):
        if mean is not None:
            np.savez(cfg["mean_out"], **mean)
        print(json.dumps({"updates_per_s": len(index) / (loop_s + finish_s), "loop_s": loop_s, "finish_s": finish_s,
                          "peak_rss_mb": status_mb("VmHWM"), "rss_before_mb": rss_before_mb, **extra}), flush=True)
    cpu = time.process_time  # this process's CPU seconds: what the loop cost, whatever else shares the machine
    def runq():
        # Seconds this process was runnable but waiting for a CPU (other processes had them): the machine's load,
        # not fedge's work. Linux /proc/self/schedstat: on-CPU ns, run-queue wait ns, timeslices; 0 elsewhere.
        try:
            with open("/proc/self/schedstat") as fh:
                return int(fh.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0
    """
)

_OPEN_VALIDATE = textwrap.dedent(
    """
    validator = UpdateValidator(params=spec, max_norm=cfg["norm_bound"], fleet=cfg["fleet"], region=cfg["region"],
                                bundle_version=cfg["bundle_version"])
    limits_total = sum(8 * int(np.prod(s)) for s, _ in spec.values())
    limits = DecodeLimits(max_tensors=2 * len(spec) + 8, max_total_bytes=2 * limits_total + 4096)
    def open_blob(blob):
        opened = open_update(blob, recipient_key=region_key, sender_public_key=devices, limits=limits)
        validator.validate(opened, current_round=0)
        return opened
    def open_valid(i):
        return open_blob(next_blob(i))
    """
)

_REGION = textwrap.dedent(
    """
    from sdk.aggregator import IncomingUpdate, RegionalAggregator, RegionalConfig, RoundPolicy, Verdict
    from sdk.aggregation.influence import InfluencePolicy
    config = RegionalConfig(
        fleet=cfg["fleet"], region=cfg["region"], encryption_key=region_key,
        signing_key=Ed25519PrivateKey.from_private_bytes(seed("ed25519:" + cfg["region"])),
        device_keys=devices,
        root_verify_key=Ed25519PrivateKey.from_private_bytes(seed("ed25519:root")).public_key(),
        root_encryption_key=X25519PrivateKey.from_private_bytes(seed("x25519:root")).public_key(),
        spec=spec, bundle_version=cfg["bundle_version"],
        policy=RoundPolicy(quorum=len(index), deadline_s=86400.0), norm_bound=cfg["norm_bound"],
        # Fixed bounds that do not bind (same clipping work as the default), so the mean matches the plain reference.
        influence=InfluencePolicy(norm="fixed", norm_bound=cfg["norm_bound"], weight="fixed", max_sample_count=1_000_000),
    )
    agg = RegionalAggregator.open(cfg["db"], config, member=cfg.get("member", "main"))
    agg.start_round(0, {name: np.zeros(shape, dtype=np.float32) for name, (shape, _) in spec.items()})
    commits, lock_waits = [], []
    agg.observe_commits(commits.append)
    agg.observe_lock_waits(lock_waits.append)
    rss_before_mb = status_mb("VmRSS")
    def run_batches():
        # What the service does under load: the queue fills batches of cfg["batch"] updates.
        batch = cfg["batch"]
        for start in range(0, len(mine), batch):
            items = [IncomingUpdate(blob=next_blob(i)) for i in mine[start:start + batch]]
            for handled in agg.handle_updates(items):
                if handled.verdict is not Verdict.ACCEPTED:
                    raise SystemExit(f"an update was not accepted: {handled.reason}")
    """
)

DURABLE = _PRELUDE + _REGION + textwrap.dedent(
    """
    t0, c0, q0 = time.perf_counter(), cpu(), runq()
    run_batches()
    t1, c1, q1 = time.perf_counter(), cpu(), runq()
    aggregate = agg.close_round()
    t2 = time.perf_counter()
    agg.close()
    report(aggregate.mean_delta, t1 - t0, t2 - t1, commit_s=sum(commits), commits=len(commits), cpu_s=c1 - c0, runq_s=q1 - q0,
           lock_s=sum(lock_waits))
    """
)

MEMBER = _PRELUDE + _REGION + textwrap.dedent(
    """
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # "go": every member starts together
    t0, c0, q0 = time.perf_counter(), cpu(), runq()  # perf_counter is CLOCK_MONOTONIC: comparable across the members
    run_batches()
    t1, c1, q1 = time.perf_counter(), cpu(), runq()
    print(json.dumps({"t0": t0, "t1": t1, "commit_s": sum(commits), "commits": len(commits), "cpu_s": c1 - c0,
                      "runq_s": q1 - q0, "lock_s": sum(lock_waits)}), flush=True)
    if sys.stdin.readline().strip() == "close":
        t2 = time.perf_counter()
        aggregate = agg.close_round()
        report(aggregate.mean_delta, t1 - t0, time.perf_counter() - t2)
    agg.close()
    """
)

NAIVE = _PRELUDE + _OPEN_VALIDATE + textwrap.dedent(
    """
    t0, c0, q0 = time.perf_counter(), cpu(), runq()
    kept = []
    for i in range(len(index)):
        opened = open_valid(i)
        kept.append((opened.tensors, opened.header.sample_count))
    t1, c1, q1 = time.perf_counter(), cpu(), runq()
    total = float(sum(n for _, n in kept))
    mean = {name: (sum(n * t[name].astype(np.float64) for t, n in kept) / total).astype(np.float32) for name in spec}
    t2 = time.perf_counter()
    report(mean, t1 - t0, t2 - t1, cpu_s=c1 - c0, runq_s=q1 - q0)
    """
)

# "memory" reads each update just before it opens it (cfg["received"] 1); "memory-batched" takes cfg["batch"]
# received updates at a time, as the durable path is handed them (the service's queue holds them), then opens each:
# durable / memory-batched is the price of the store and the receipts alone.
MEMORY = _PRELUDE + _OPEN_VALIDATE + textwrap.dedent(
    """
    from sdk.aggregation import StreamingWeightedMean
    acc = StreamingWeightedMean(expected_shapes={name: shape for name, (shape, _) in spec.items()})
    received_at_once = cfg.get("received", 1)
    t0, c0, q0 = time.perf_counter(), cpu(), runq()
    for start in range(0, len(index), received_at_once):
        received = [next_blob(i) for i in range(start, min(start + received_at_once, len(index)))]
        for blob in received:
            opened = open_blob(blob)
            acc.accumulate(opened.tensors, float(opened.header.sample_count), checked=True)  # validated above
        del received
    t1, c1, q1 = time.perf_counter(), cpu(), runq()
    mean = acc.finalize()
    t2 = time.perf_counter()
    report(mean, t1 - t0, t2 - t1, cpu_s=c1 - c0, runq_s=q1 - q0)
    """
)

PART_NAMES = ("header", "prehash", "ed25519", "x25519_hkdf", "chacha20", "decode", "digest", "validate", "bounds_fold",
              "receipt")
"""The stages the ``parts`` child times, in the intake's order: frame + header parse, the prehash (frame version 2:
SHA-256 over the frame; 0 for version 1), Ed25519 verification (version 1: SHA-512 over the whole frame inside it;
version 2: over 70 bytes), X25519 + HKDF, ChaCha20-Poly1305, tensor decoding, the content digest (version 1: SHA-256
over header + plaintext; version 2: the prehash again, already computed), validation
(header checks, names, shapes, finiteness + norm in one float64 pass), admission + clipping + the float64 fold,
the receipt's Ed25519 signature."""

# Each stage of the durable intake timed alone, on the same updates, in the order the intake runs them.
# The envelope's private helpers are used so that parsing, verification, key agreement, decryption and decoding
# can be timed apart.
PARTS = _PRELUDE + textwrap.dedent(
    """
    from device_agent.keys import raw_public_bytes
    from device_agent.protocol._frame import FRAME_VERSIONS, split_frame, verify_frame
    from device_agent.protocol.envelope import UPDATE_MAGIC, _PUBLIC_BYTES, _cipher
    from device_agent.protocol.headers import UpdateHeader
    from device_agent.protocol.receipts import Receipt, sign_receipt
    from device_agent.protocol.tensor_codec import decode_tensors
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from sdk.aggregation import StreamingWeightedMean
    from sdk.aggregation.robust import scale_delta
    from sdk.aggregation.influence import RoundBounds
    from sdk.aggregator.admission import admit
    from device_agent.protocol.envelope import OpenedUpdate
    validator = UpdateValidator(params=spec, max_norm=cfg["norm_bound"], fleet=cfg["fleet"], region=cfg["region"],
                                bundle_version=cfg["bundle_version"])
    limits_total = sum(8 * int(np.prod(s)) for s, _ in spec.values())
    limits = DecodeLimits(max_tensors=2 * len(spec) + 8, max_total_bytes=2 * limits_total + 4096)
    signer = Ed25519PrivateKey.from_private_bytes(seed("ed25519:" + cfg["region"]))
    base = {name: np.zeros(shape, dtype=np.float32) for name, (shape, _) in spec.items()}
    bounds = RoundBounds(clip_norm=cfg["norm_bound"], weight_cap=1_000_000)
    rule = StreamingWeightedMean(expected_shapes={name: shape for name, (shape, _) in spec.items()})
    parts = dict.fromkeys(cfg["part_names"], 0.0)
    clock = time.process_time  # CPU time: the stages' own cost, robust to whatever else shares the cores
    for i in range(len(index)):
        blob = next_blob(i)
        t0 = clock()
        frame = split_frame(blob, magic=UPDATE_MAGIC, what="sealed update", min_body=48, max_bytes=len(blob) + 1,
                            versions=FRAME_VERSIONS)
        header = UpdateHeader.from_bytes(frame.record)
        t1 = clock()
        frame.message  # the prehash of a version-2 frame (computed once; nothing for version 1)
        tp = clock()
        verify_frame(frame, [devices[header.sender]])
        t2 = clock()
        ephemeral = bytes(frame.body[:_PUBLIC_BYTES])
        shared = region_key.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        cipher, nonce = _cipher(shared, frame.record, ephemeral, raw_public_bytes(region_key.public_key()))
        t3 = clock()
        plaintext = cipher.decrypt(nonce, frame.body[_PUBLIC_BYTES:], frame.signed[: len(frame.signed) - len(frame.body) + _PUBLIC_BYTES])
        t4 = clock()
        tensors = decode_tensors(plaintext, encoding=header.encoding, limits=limits)
        t5 = clock()
        if frame.digest is None:  # version 1: hash header + plaintext; version 2: the signature's own digest
            hasher = hashlib.sha256(frame.record)
            hasher.update(plaintext)
            hasher.digest()
        t6 = clock()
        validator.check_header(header, 0)
        norm = validator.check_tensors(tensors)
        t7 = clock()
        admission = admit(OpenedUpdate(header=header, tensors=tensors, sender_key_id=""), base=base, bounds=bounds,
                          weight=float(header.sample_count), norm=norm, base_largest=0.0)
        rule.accumulate(scale_delta(tensors, admission.scale) if admission.clipped else tensors, admission.weight, checked=True)
        t8 = clock()
        sign_receipt(Receipt.answering(header, issuer=cfg["region"]), signer_key=signer)
        t9 = clock()
        for name, took in zip(parts, (t1 - t0, tp - t1, t2 - tp, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7, t9 - t8)):
            parts[name] += took
    print(json.dumps({name: total / len(index) for name, total in parts.items()}), flush=True)
    """
)

SCRIPTS = {"durable": DURABLE, "unbatched": DURABLE, "naive": NAIVE, "memory": MEMORY, "memory-batched": MEMORY, "parts": PARTS}
