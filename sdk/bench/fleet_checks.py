"""The fleet benchmark's checks: which receipts say accepted, and the global model a run must end with.

Pure apart from reading the regions' public keys from the fleet directory.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdk.bench.fleet_setup import BenchFleet


def count_receipts(bench: BenchFleet, results: list[dict[str, Any]]) -> tuple[dict[str, dict[int, int]], int]:
    """device -> round -> how many verified receipts said accepted for that round's update; and how many receipts
    answered no update of the device or said something else (duplicates of a resend count there)."""
    from device_agent.keys import load_verify_key
    from device_agent.protocol.receipts import ReceiptStatus, open_receipt

    keys = {r: load_verify_key(bench.signing_pub(r)) for r in bench.regions}
    accepted: dict[str, dict[int, int]] = {}
    other = 0
    for result in results:
        for device, record in result["devices"].items():
            nonces = {bytes.fromhex(n): r for r, n in enumerate(result["nonces"][device])}
            counts = accepted.setdefault(device, {})
            for _, blob in record["receipts"]:
                receipt = open_receipt(bytes.fromhex(blob), trusted_signers=[keys[bench.devices[device][0]]])
                r = nonces.get(receipt.update_nonce)
                if r is not None and receipt.device == device and receipt.status is ReceiptStatus.ACCEPTED:
                    counts[r] = counts.get(r, 0) + 1
                else:
                    other += 1
    return accepted, other


def reference_model(bench: BenchFleet, rounds: int, seed: int,
                    initial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The global model after ``rounds`` rounds, in float64 numpy, from the updates the generators sent.

    Each region bounds each update (the default :class:`~sdk.aggregation.influence.InfluencePolicy`: clip to the
    round's norm bound, weight = min(sample count, cap); round 0's bounds are the policy's first ones, later
    rounds' come from that region's previous round); the root weights each region's mean by the sum of its
    bounded weights, which is one weighted mean over every device.
    """
    from sdk.aggregation.influence import InfluencePolicy, first_bounds, next_bounds
    from sdk.bench.fleet_load import device_delta, sample_count

    policy = InfluencePolicy()
    model = {n: v.astype(np.float64) for n, v in initial.items()}
    bounds = {region: first_bounds(policy) for region in bench.regions}
    for r in range(rounds):
        total = {n: np.zeros_like(v) for n, v in model.items()}
        weight_sum = 0.0
        for region in bench.regions:
            norms, counts = [], []
            for device, (reg, index) in bench.devices.items():
                if reg != region:
                    continue
                delta = device_delta(bench.spec, index=index, round=r, seed=seed)
                norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))
                count = sample_count(index, r)
                scale, weight = bounds[region].clip_scale(norm), bounds[region].weight(count)
                for n, v in delta.items():
                    total[n] += weight * scale * v.astype(np.float64)
                weight_sum += weight
                norms.append(norm)
                counts.append(count)
            bounds[region] = next_bounds(policy, bounds[region], norms=norms, sample_counts=counts)
        model = {n: model[n] + total[n] / weight_sum for n in model}
    return model
