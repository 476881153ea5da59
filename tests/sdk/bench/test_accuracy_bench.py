"""The accuracy benchmark: the summary's arithmetic and claims (pure), and one real tiny run end to end."""

from __future__ import annotations

import json

import pytest

from sdk.bench.accuracy_bench import (
    AccuracyRun,
    AccuracySetting,
    format_table,
    run_one,
    settings,
    summarise,
    write_setting,
)

SETTING = AccuracySetting(name="t", title="test", dataset="digits", model="mlp", rounds=2, epochs=1, batch_size=16,
                          learning_rate=0.01, optimizer="adamw", runs=())


def _result(label: str, algorithm: str, personalised: dict[str, float], *, global_: dict[str, float] | None = None,
            fine_tuned: dict | None = None, head: int = 10, params: int = 1000) -> dict:
    return {
        "label": label, "run": {"algorithm": algorithm}, "parameters": params, "head_parameters": head, "seconds": 1.0,
        "test_examples": {"a": 10, "b": 30},
        "final": {"personalised": personalised, "global": global_ or {}, "regional": {}, "fine_tuned": fine_tuned or {}},
        "rounds": [{"round": 0, "mean": 0.1, "pooled": 0.2, "bytes_up_per_device": 400, "bytes_down_per_device": 800}],
    }


def test_summary_rows_pooled_share_and_fine_tuned_rows() -> None:
    results = [
        _result("Local-only", "local", {"a": 0.5, "b": 0.9}),
        _result("FedAvg", "fedavg", {"a": 0.4, "b": 0.6}, global_={"a": 0.4, "b": 0.6},
                fine_tuned={"all": {"a": 0.8, "b": 0.8}, "head": {"a": 0.7, "b": 0.7}}),
        _result("FedSim", "fedsim", {"a": 0.85, "b": 0.85}, global_={"a": 0.85, "b": 0.85}),
        _result("FedAlt", "fedalt", {"a": 0.9, "b": 0.88}),
    ]
    summary = summarise(SETTING, results)
    rows = {r["label"]: r for r in summary["rows"]}
    assert list(rows) == ["Local-only", "FedAvg", "FedAvg+FT(all)", "FedAvg+FT(head)", "FedSim", "FedAlt"]
    assert rows["FedAvg"]["pooled"] == pytest.approx((0.4 * 10 + 0.6 * 30) / 40)
    assert rows["FedAvg"]["personalised_mean"] == pytest.approx(0.5)
    assert rows["FedAvg"]["global_mean"] == pytest.approx(0.5)
    assert rows["FedSim"]["global_mean"] is None  # a personal head means no whole global model
    assert rows["FedAlt"]["share_beating_local"] == pytest.approx(0.5)  # beats 0.5 on a, not 0.9 on b
    assert rows["Local-only"]["share_beating_local"] is None
    assert rows["FedAvg"]["best_round_pooled"] == pytest.approx(0.55)  # the final pooled beats round 0's 0.2
    assert rows["FedAvg"]["bytes_up"] == 400 and rows["FedAvg"]["bytes_down"] == 800
    claims = {c["claim"].split(" (")[0]: c for c in summary["claims"]}
    beats = next(c for k, c in claims.items() if k.startswith("the best personalised method beats"))
    assert beats["holds"] is True  # FedAlt 0.89 > FedAvg 0.5 and > local 0.7
    assert next(c for k, c in claims.items() if k.startswith("FedAlt matches"))["holds"] is True
    pillutla = next(c for k, c in claims.items() if k.startswith("a personal head"))
    # gain FedAlt 0.39, full fine-tuning 0.30 -> ratio 1.3, head 1% of the parameters
    assert pillutla["holds"] is True and "ratio 1.30" in pillutla["evidence"]
    table = format_table(SETTING, summary)
    assert "| FedAvg+FT(head) | 70.00 ± 0.00 |" in table and "**holds**" in table


def test_claims_can_fail() -> None:
    results = [
        _result("Local-only", "local", {"a": 0.95, "b": 0.95}),
        _result("FedAvg", "fedavg", {"a": 0.4, "b": 0.6}, global_={"a": 0.4, "b": 0.6},
                fine_tuned={"all": {"a": 0.9, "b": 0.9}}),
        _result("FedSim", "fedsim", {"a": 0.9, "b": 0.9}),
        _result("FedAlt", "fedalt", {"a": 0.6, "b": 0.6}, head=200),
    ]
    holds = {c["claim"][:20]: c["holds"] for c in summarise(SETTING, results)["claims"]}
    assert holds == {"the best personalise": False, "FedAlt matches or be": False, "a personal head with": False}


def test_synthetic_straggler_claim_reads_the_90_percent_rows() -> None:
    setting = settings("quick")["synthetic"]
    results = [
        _result("FedAvg, 90% stragglers", "fedavg", {"a": 0.3, "b": 0.3}, global_={"a": 0.3, "b": 0.3}),
        _result("FedProx mu=1, 90% stragglers", "fedprox", {"a": 0.5, "b": 0.5}, global_={"a": 0.5, "b": 0.5}),
    ]
    (claim,) = summarise(setting, results)["claims"]
    assert claim["holds"] is True and "FedProx 0.5000 vs FedAvg 0.3000" in claim["evidence"]


def test_a_real_tiny_run_writes_json_markdown_and_plots(tmp_path) -> None:
    setting = AccuracySetting(name="digits-tiny", title="digits", dataset="digits", model="mlp", rounds=2, epochs=1,
                              batch_size=16, learning_rate=0.01, optimizer="adamw", regions="labels-2",
                              runs=(AccuracyRun(label="Local-only", algorithm="local"),
                                    AccuracyRun(label="FedAvg", algorithm="fedavg", finetune_epochs=1),
                                    AccuracyRun(label="Hier. FedAvg a=0.5", algorithm="fedavg", regional_weight=0.5)))
    results = [run_one(setting, run, seed=0) for run in setting.runs]
    assert [len(r["rounds"]) for r in results] == [2, 2, 2]
    assert set(results[1]["final"]["fine_tuned"]) == {"head", "all"}
    assert results[2]["final"]["regional"] and set(results[2]["regions"].values()) == {"labels-0", "labels-1"}
    assert results[0]["rounds"][0]["bytes_up_per_device"] == 0 < results[1]["rounds"][0]["bytes_up_per_device"]
    # Same seed, same numbers.
    assert run_one(setting, setting.runs[1], seed=0)["final"] == results[1]["final"]
    table, summary = write_setting(setting, results, tmp_path, seed=0, profile="quick")
    for name in ("digits-tiny.json", "digits-tiny.md", "digits-tiny-rounds.png", "digits-tiny-gain.png", "digits-tiny-tiers.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    payload = json.loads((tmp_path / "digits-tiny.json").read_text())
    assert payload["summary"] == json.loads(json.dumps(summary))
    assert "Hier. FedAvg a=0.5" in table


def test_every_setting_names_known_algorithms() -> None:
    from sdk.simulation.algorithms import ALGORITHMS

    for profile in ("quick", "full"):
        for s in settings(profile).values():  # type: ignore[arg-type]
            assert s.runs and all(r.algorithm in ALGORITHMS for r in s.runs)
            assert len({r.label for r in s.runs}) == len(s.runs)


def test_a_lead_under_half_a_point_over_local_only_is_a_tie_not_a_win() -> None:
    results = [
        _result("Local-only", "local", {"a": 0.948, "b": 0.948}),
        _result("FedAvg", "fedavg", {"a": 0.7, "b": 0.7}, global_={"a": 0.7, "b": 0.7}),
        _result("FedFomo", "fedfomo", {"a": 0.9483, "b": 0.9483}),
    ]
    (claim,) = [c for c in summarise(SETTING, results)["claims"] if c["claim"].startswith("the best personalised")]
    assert claim["holds"] is False and "a tie with local-only" in claim["evidence"]


def test_compression_claim_compares_bytes_up_and_down_and_accuracy_with_the_float32_run() -> None:
    def squeezed(label: str, acc: float, up: int, down: int, spec: str = "q4") -> dict:
        r = _result(label, "fedavg", {"a": acc, "b": acc})
        r["run"] = {"algorithm": "fedavg", "compression": spec, "downlink": spec}
        r["rounds"] = [{**r["rounds"][0], "bytes_up_per_device": up, "bytes_down_per_device": down}]
        return r

    results = [_result("FedAvg", "fedavg", {"a": 0.8, "b": 0.8}),  # 400 up + 800 down
               squeezed("FedAvg, small", 0.797, 50, 100), squeezed("FedAvg, lossy", 0.78, 50, 100),
               squeezed("FedAvg, big", 0.8, 100, 100)]
    claims = {c["claim"].split(":")[0]: c for c in summarise(SETTING, results)["claims"]}
    assert claims["FedAvg, small"]["holds"] is True and "8.0x fewer bytes up + down (up alone 8.0x)" in claims["FedAvg, small"]["evidence"]
    assert claims["FedAvg, lossy"]["holds"] is False and "-2.00 points" in claims["FedAvg, lossy"]["evidence"]
    assert claims["FedAvg, big"]["holds"] is False and "6.0x" in claims["FedAvg, big"]["evidence"]
