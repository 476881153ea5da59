"""The accuracy benchmark: the summary's arithmetic and claims (pure), and one real tiny run end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from sdk.bench.accuracy_bench import (
    AccuracyRun,
    AccuracySetting,
    format_table,
    reported_results,
    run_accuracy_bench,
    run_one,
    settings,
    summarise,
    write_setting,
)
from sdk.bench.accuracy_settings import cut_setting

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
    _resume_reuses_the_reports_runs(setting, tmp_path)


def _resume_reuses_the_reports_runs(setting: AccuracySetting, out) -> None:
    """--resume takes the runs a report already holds (also from a report cut with --run) and trains nothing again;
    a changed hyper-parameter, another profile or another seed reuses nothing."""
    saved = json.loads((out / f"{setting.name}.json").read_text())["runs"]
    assert set(reported_results(out, setting, profile="quick")) == {(r.label, 0) for r in setting.runs}
    assert reported_results(out, setting, profile="full") == {}
    assert reported_results(out, replace(setting, learning_rate=0.02), profile="quick") == {}
    assert reported_results(out, replace(setting, seeds=(1,)), profile="quick") == {}
    changed = replace(setting, runs=(replace(setting.runs[0], finetune_epochs=3), *setting.runs[1:]))
    assert set(reported_results(out, changed, profile="quick")) == {(r.label, 0) for r in setting.runs[1:]}
    said: list[str] = []
    run_accuracy_bench([setting.name], profile="quick", workers=1, out_dir=out, extra=[setting], resume=True, progress=said.append)
    assert said == [f"{setting.name}: {r.label} (seed 0) reused from {out / f'{setting.name}.json'}" for r in setting.runs]
    assert json.loads((out / f"{setting.name}.json").read_text())["runs"] == saved
    cut = cut_setting(setting, labels=("FedAvg",))
    write_setting(cut, [r for r in saved if r["label"] == "FedAvg"], out, seed=0, profile="quick")
    assert set(reported_results(out, setting, profile="quick")) == {("FedAvg", 0)}


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


def _seeded(seed: int, label: str, algorithm: str, personalised: dict[str, float], **kwargs) -> dict:
    result = _result(label, algorithm, personalised, **kwargs)
    result["seed"] = seed
    return result


SCARCE = AccuracySetting(name="t-n10", title="test", dataset="digits", model="mlp", rounds=2, epochs=1, batch_size=16,
                         learning_rate=0.01, optimizer="adamw", runs=(), seeds=(0, 1, 2), per_class=10)


def test_gains_over_local_only_are_paired_by_device_and_seed() -> None:
    local = [{"a": 0.50, "b": 0.80}, {"a": 0.52, "b": 0.80}, {"a": 0.48, "b": 0.80}]
    method = [{"a": 0.60, "b": 0.81}, {"a": 0.62, "b": 0.79}, {"a": 0.61, "b": 0.80}]
    results = [r for k in range(3) for r in (_seeded(k, "Local-only", "local", local[k]), _seeded(k, "FedAlt", "fedalt", method[k]))]
    summary = summarise(SCARCE, results)
    row = next(r for r in summary["rows"] if r["label"] == "FedAlt")
    # gains: a = 0.10, 0.10, 0.13 (mean 0.11, std 0.0173); b = 0.01, -0.01, 0.00 (mean 0, std 0.01)
    assert row["gain_mean"] == pytest.approx((0.10 + 0.10 + 0.13 + 0.01 - 0.01 + 0.0) / 6)
    per_seed_mean_gain = [(0.10 + 0.01) / 2, (0.10 - 0.01) / 2, (0.13 + 0.0) / 2]
    assert row["gain_seed_std"] == pytest.approx(float(np.std(per_seed_mean_gain, ddof=1)))
    assert row["share_clear"] == pytest.approx(0.5)  # a clearly ahead, b not (mean gain 0 is not above its spread)
    assert row["seeds"] == 3 and row["personalised_seed_std"] == pytest.approx(float(np.std([0.705, 0.705, 0.705], ddof=1)), abs=1e-9)
    assert row["per_device"]["a"] == pytest.approx(0.61)
    (clear,) = [c for c in summary["claims"] if "seed spread" in c["claim"]]
    assert clear["holds"] is False and "clearly ahead on 50% of devices" in clear["evidence"]
    assert clear["evidence"].endswith("other rows that meet both: none")
    table = format_table(SCARCE, summary)
    assert "clearly ahead" in table and "| FedAlt | 70.50 ± 0.00 |" in table and "+5.50 ± " in table


def test_the_clear_gain_claim_holds_when_every_device_is_ahead_beyond_the_spread() -> None:
    results = []
    for k, wobble in enumerate((0.0, 0.01, -0.01)):
        results.append(_seeded(k, "Local-only", "local", {"a": 0.5 + wobble, "b": 0.6 - wobble}))
        results.append(_seeded(k, "Ditto", "ditto", {"a": 0.7 + wobble, "b": 0.8 - wobble}))
    (clear,) = [c for c in summarise(SCARCE, results)["claims"] if "seed spread" in c["claim"]]
    assert clear["holds"] is True and "+20.00 points" in clear["evidence"]


def test_a_ditto_run_gives_its_personal_model_and_its_choice_as_two_rows() -> None:
    ditto = _result("Ditto", "ditto", {"a": 0.9, "b": 0.7}, global_={"a": 0.6, "b": 0.6})
    ditto["final"]["personal_model"] = {"a": 0.8, "b": 0.7}
    ditto["final"]["serving_weight"] = {"a": 1.0, "b": 0.4}
    ditto["rounds"][0]["personal_model_mean"] = 0.3
    results = [_result("Local-only", "local", {"a": 0.85, "b": 0.65}), ditto]
    summary = summarise(SETTING, results)
    rows = {r["label"]: r for r in summary["rows"]}
    assert rows["Ditto"]["personalised_mean"] == pytest.approx(0.75) and rows["Ditto+choice"]["personalised_mean"] == pytest.approx(0.8)
    assert rows["Ditto"]["global_mean"] == rows["Ditto+choice"]["global_mean"] == pytest.approx(0.6)
    assert rows["Ditto+choice"]["gain_mean"] == pytest.approx(0.05) and rows["Ditto+choice"]["share_clear"] is None
    assert summary["choices"]["Ditto+choice"] == {"personal": 1, "global": 0, "mixture": 1, "weights": [1.0, 0.4]}
    assert "1 of 2 devices served their personal model, 0 the global model and 1 a mixture" in format_table(SETTING, summary)
    from sdk.bench.accuracy_report import round_curves

    assert round_curves(results) == {"Local-only": [0.1], "Ditto": [0.3], "Ditto+choice": [0.1]}


def test_cold_start_summary_and_claims_compare_with_local_only_on_the_same_examples() -> None:
    from sdk.bench.accuracy_cold_start import cold_start_claims, cold_start_summary, format_cold_start

    def joined(label: str, seed: int, entries: list[tuple[str, int, float | None, float, float | None]]) -> dict:
        result = _seeded(seed, label, "fedavg", {"a": 0.5, "b": 0.5})
        result["cold_start"] = [{"device": d, "join_round": 5, "samples": n, "zero_shot": z, "fleet": f, "local": loc}
                                for d, n, z, f, loc in entries]
        return result

    results = [joined("FedAvg", 0, [("x", 10, 0.5, 0.7, 0.4), ("y", 10, 0.5, 0.3, 0.6)]),
               joined("FedAlt", 0, [("x", 10, None, 0.9, None), ("y", 10, None, 0.8, None)])]
    summary = cold_start_summary(results)
    (row,) = summary["rows"]
    assert row["ways"]["local-only"]["mean"] == pytest.approx(0.5)
    assert row["ways"]["FedAvg + head"]["beats_local"] == pytest.approx(0.5)
    assert row["ways"]["FedAlt + head"] == {"mean": pytest.approx(0.85), "std": pytest.approx(0.05), "n": 2, "beats_local": 1.0}
    assert "FedAlt + head" in format_cold_start(summary) and "85.0 ± 5.0 (100%)" in format_cold_start(summary)
    (claim,) = cold_start_claims(summary)
    assert claim["holds"] is True and claim["evidence"].startswith("FedAlt + head 85.0 vs local-only 50.0")


def test_a_cut_setting_keeps_the_named_runs_and_rounds_and_says_so() -> None:
    from sdk.bench.accuracy_settings import cut_setting

    full = settings("full")["fmnist-full"]
    cut = cut_setting(full, rounds=20, labels=("FedAlt", "Local-only"))
    assert cut.name == full.name and cut.rounds == 20 and [r.label for r in cut.runs] == ["Local-only", "FedAlt"]
    assert "20 of its 100 rounds and 2 of its 4 runs" in cut.title and "--rounds/--run" in cut.notes[-1]
    assert cut_setting(full) is full and cut_setting(full, rounds=100) is full
    with pytest.raises(ValueError, match="between 1 and"):
        cut_setting(full, rounds=101)
    with pytest.raises(ValueError, match="no runs \\['FedRep'\\]"):
        cut_setting(full, labels=("FedRep",))
    cold = settings("full")["cold-start-watch"]
    assert cut_setting(cold, rounds=10).join_rounds == (1, 5, 10)
    with pytest.raises(ValueError, match="keep at least the first"):
        cut_setting(replace(cold, join_rounds=(5,)), rounds=2)


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


def test_a_run_with_the_choice_against_local_gives_its_candidates_and_choices_as_rows() -> None:
    fedavg = _result("FedAvg", "fedavg", {"a": 0.5, "b": 0.5}, global_={"a": 0.5, "b": 0.5})
    fedavg["final"]["candidates"] = {"FT(all)": {"a": 0.9, "b": 0.6}, "local+served": {"a": 0.8, "b": 0.7},
                                     "local+FT(all)": {"a": 0.95, "b": 0.75}}
    fedavg["final"]["chosen"] = {"ties to local": {"a": 0.9, "b": 0.65}}
    fedavg["final"]["chosen_model"] = {"ties to local": {"a": "FT(all)", "b": "local"}}
    summary = summarise(SETTING, [_result("Local-only", "local", {"a": 0.85, "b": 0.65}), fedavg])
    rows = {r["label"]: r for r in summary["rows"]}
    assert rows["FedAvg+FT(all, early stop)"]["personalised_mean"] == pytest.approx(0.75)
    assert rows["FedAvg, ensemble with local"]["gain_mean"] == pytest.approx(0.0)
    assert rows["FedAvg+FT(all, early stop), ensemble with local"]["gain_mean"] == pytest.approx(0.1)
    assert rows["FedAvg, chosen (ties to local)"]["gain_mean"] == pytest.approx(0.025)
    assert summary["picked"] == {"FedAvg, chosen (ties to local)": {"FT(all)": 1, "local": 1}}
    assert "FedAvg, chosen (ties to local): of 2 devices kept 1 FT(all), 1 local" in format_table(SETTING, summary)


def test_the_clear_gain_claim_checks_the_highest_gain_and_names_other_rows_that_would_meet_it() -> None:
    results = []
    for k, wobble in enumerate((0.0, 0.01, -0.01)):
        results.append(_seeded(k, "Local-only", "local", {"a": 0.5, "b": 0.6}))
        results.append(_seeded(k, "FedAlt", "fedalt", {"a": 0.9 if k else 0.4, "b": 0.8}))  # larger gain, device a not consistent
        results.append(_seeded(k, "Ditto", "ditto", {"a": 0.55 + wobble, "b": 0.65 - wobble}))  # small, steady gains
    (clear,) = [c for c in summarise(SCARCE, results)["claims"] if "seed spread" in c["claim"]]
    assert clear["holds"] is False and clear["evidence"].startswith("FedAlt: ")
    assert "other rows that meet both: Ditto (100%, +5.00 vs " in clear["evidence"]
