"""The results folder as a store: concurrent writers, a cut-short last row, timing conditions per row."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench import report as report_mod
from bench import results as results_mod
from bench import run as run_mod

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--model", "gmm2d", "--num-samples", "40", "--metric", "fd_data", "--no-report", "--threads", "1"]


def _env() -> dict:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return env


def _bench(out: Path, *args: str) -> int:
    return run_mod.main(["--quiet", "--out", str(out), *args])


# -- concurrent runs --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_concurrent_runs_into_one_folder_keep_every_row(tmp_path):
    out = tmp_path / "shared"
    steps = "1,2,3,4"
    procs = [subprocess.Popen([sys.executable, "-m", "bench.run", "--quiet", "--out", str(out), *SMALL,
                               "--solvers", solver_list, "--steps", steps], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for solver_list in ("ddim,dpmpp", "heun,ddpm")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    df = pd.read_csv(out / "results.csv")
    got = sorted(zip(df["solver_label"], df["steps"]))
    assert got == sorted((s, n) for s in ("ddim", "dpmpp", "heun", "ddpm") for n in (1, 2, 3, 4))
    assert (df["status"] == "ok").all()


def test_record_row_keeps_rows_another_process_wrote_since_this_one_read(tmp_path):
    out = tmp_path / "merge"
    settings = {"model": "gmm2d", "num_samples": 40, "seed": 0, "metrics": "fd_data", "dtype": "float64",
                "reference": "exact", "device_type": "cpu", "reference_size": None, "network": "eager", "rng": "torch",
                "model_options": "{}", "threads": 1, "batch_size": 40}

    def row(key: str) -> dict:
        return {"schema_version": results_mod.SCHEMA_VERSION, "cell_key": key, "status": "ok", "threads": 1,
                **{k: v for k, v in settings.items() if k not in ("threads",)}}

    results_mod.record_row(out, row("a"), settings)
    # Another process adds "b" behind this one's back; this process then records "c" …
    other = results_mod.upsert_row(results_mod.load_results(out), row("b"))
    results_mod.save_results(other, out)
    written = results_mod.record_row(out, row("c"), settings)
    assert list(written["cell_key"]) == ["a", "b", "c"]
    assert list(pd.read_csv(out / "results.csv")["cell_key"]) == ["a", "b", "c"]
    # … and redoing "a" replaces it rather than adding a row.
    assert list(results_mod.record_row(out, row("a"), settings)["cell_key"]) == ["b", "c", "a"]


# -- a last row cut short ------------------------------------------------------------------------------------------
def _cut_last_row(path: Path, where: str) -> None:
    text = path.read_text()
    start = text.rstrip("\n").rfind("\n") + 1  # the last row
    last = text[start:]
    cut = {"middle": start + len(last) // 2,  # in the middle of the row
           "end": len(text) - 2,  # only its last character and the line break lost
           "quoted": start + last.index('"{') + 2}[where]  # inside a quoted field (the JSON of metric_labels)
    path.write_text(text[:cut])


@pytest.mark.parametrize("where", ["middle", "end", "quoted"])
def test_a_last_row_cut_short_is_named_and_redone(tmp_path, capsys, where):
    out = tmp_path / "cut"
    args = [*SMALL, "--solvers", "ddim", "--steps", "1,2"]
    assert _bench(out, *args) == 0
    full = pd.read_csv(out / "results.csv")
    cut_id = full["cell_id"].iloc[-1]
    _cut_last_row(out / "results.csv", where)
    capsys.readouterr()
    assert run_mod.main(["--out", str(out), *args]) == 0
    err = capsys.readouterr().err
    assert f"the last row (cell {cut_id}) is incomplete" in err
    assert "2 cells (1 to run; skipping 1 done)" in err
    after = pd.read_csv(out / "results.csv")
    assert list(after["cell_id"]) == list(full["cell_id"])
    assert list(after.columns) == list(full.columns)  # provenance columns kept
    for col in ("hostname", "git_commit", "torch", "finished_at", "time_cell_s", "metric.fd_data", "threads"):
        assert after[col].notna().all(), col
    pd.testing.assert_frame_equal(after.iloc[:1], full.iloc[:1])  # the complete row was not redone


def test_split_incomplete_row_finds_every_kind_of_cut():
    split = results_mod.split_incomplete_row
    assert split("a,b\n1,2\n") == ("a,b\n1,2\n", None)
    assert split('a,b\n1,"x\ny"\n') == ('a,b\n1,"x\ny"\n', None)  # a line break inside quotes is not a cut
    assert split("a,b\n1,2\n3,4") == ("a,b\n1,2\n", {"a": "3", "b": "4"})  # no final line break
    assert split("a,b\n1,2\n3\n") == ("a,b\n1,2\n", {"a": "3"})  # too few fields
    assert split('a,b\n1,"x\n') == ("a,b\n", {"a": "1", "b": "x\n"})  # quotes left open
    assert split("a,") == ("", {})  # cut inside the header
    with pytest.raises(ValueError, match="record 2 has 1 fields, the header 2"):
        split("a,b\n1\n2,3\n")


def test_a_foreign_file_without_a_line_break_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "results.csv").write_text("hello")
    assert _bench(out, *SMALL, "--solvers", "ddim", "--steps", "1") == 2
    assert "is not a results table" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == "hello"


# -- timing conditions -----------------------------------------------------------------------------------------------
def test_cells_timed_under_other_threads_or_batch_size_are_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "timing"
    common = [*SMALL[:-2], "--solvers", "ddim", "--batch-size", "20"]
    assert _bench(out, *common, "--threads", "1", "--steps", "1") == 0
    df = pd.read_csv(out / "results.csv")
    assert df["threads"].tolist() == [1] and df["batch_size"].tolist() == [20]
    before = (out / "results.csv").read_bytes()
    capsys.readouterr()
    assert _bench(out, *common, "--threads", "2", "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "--threads 1 in the file vs 2 now" in err and "Rerun with the same values (--threads 1)" in err
    assert "another --out" in err
    common[common.index("--batch-size") + 1] = "40"
    assert _bench(out, *common, "--threads", "1", "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "--batch-size 20 in the file vs 40 now" in err and "(--batch-size 20)" in err
    assert (out / "results.csv").read_bytes() == before


def test_old_files_without_the_threads_column_stay_readable_and_are_checked(tmp_path, capsys):
    out = tmp_path / "old"
    common = [*SMALL[:-2], "--solvers", "ddim", "--batch-size", "20"]
    assert _bench(out, *common, "--threads", "1", "--steps", "1") == 0
    df = pd.read_csv(out / "results.csv").drop(columns=["threads"])
    df["device_name"] = "Some CPU (1 threads)"  # what environment() wrote before the column existed
    df.to_csv(out / "results.csv", index=False)
    assert _bench(out, *common, "--threads", "2", "--steps", "2") == 2
    assert "--threads 1 in the file vs 2 now" in capsys.readouterr().err
    # Rows that do not say their thread count (a GPU row of an old file) are not compared on it.
    df["device_name"] = "Some GPU"
    df.to_csv(out / "results.csv", index=False)
    assert _bench(out, *common, "--threads", "2", "--steps", "2") == 0
    after = pd.read_csv(out / "results.csv")
    assert after["threads"].isna().tolist() == [True, False] and after["threads"].iloc[1] == 2


def test_the_report_names_every_thread_count_and_marks_a_mix(tmp_path):
    out = tmp_path / "mixed"
    common = [*SMALL[:-2], "--solvers", "ddim", "--batch-size", "20", "--steps", "1,2"]
    assert _bench(out, *common, "--threads", "1") == 0
    report_mod.build_report(out, quiet=True)
    md = (out / "report.md").read_text()
    assert "(1 CPU threads; batch 20;" in md and "Timings are not comparable" not in md
    # An old file made under two thread counts (before the refusal): the report says so.
    df = pd.read_csv(out / "results.csv").drop(columns=["threads"])
    df["device_name"] = ["Some CPU (1 threads)", "Some CPU (2 threads)"]
    df.to_csv(out / "results.csv", index=False)
    report_mod.build_report(out, quiet=True)
    md = (out / "report.md").read_text()
    assert "on Some CPU (1, 2 CPU threads; batch 20;" in md
    assert "**Timings are not comparable across all cells:**" in md and "CPU threads: 1, 2" in md


# --- cell identity, file names and run settings (mutation survivors of bench/results.py) ----------------------

def test_cell_ids_are_stable_across_versions():
    """A cell's id is the first 16 hex digits of the SHA-1 of its canonical JSON (keys sorted, values that JSON
    cannot hold written as str): results files from earlier versions resume only while this stays so."""
    import hashlib
    import json
    options = {"lower_order_final": False, "eta": 0.5, "path": Path("/x")}
    blob = json.dumps({"model": "gmm2d", "solver": "dpmpp_2m", "options": {"eta": 0.5, "lower_order_final": False,
                                                                        "path": "/x"},
                       "steps": 10, "spacing": "logsnr", "t_start": 0.999}, sort_keys=True)
    expected = hashlib.sha1(blob.encode()).hexdigest()[:16]
    assert results_mod.cell_key("gmm2d", "dpmpp_2m", options, 10, "logsnr", 0.999) == expected
    assert results_mod.cell_key("gmm2d", "dpmpp_2m", dict(reversed(list(options.items()))), 10.0, "logsnr",
                                0.999) == expected
    assert results_mod.cell_key("gmm2d", "dpmpp_2m", options, 10, "logsnr") != expected


def test_safe_filenames_keep_letters_digits_dash_underscore_and_dot():
    assert results_mod.safe_filename("ddim:eta=1.0 x/y") == "ddim-eta-1.0-x-y"
    assert results_mod.safe_filename("a_b-c.d9") == "a_b-c.d9"
    assert results_mod.safe_filename(3) == "3"


def test_rows_from_before_a_setting_existed_read_as_its_default(tmp_path):
    """An old file extended by a default run has empty cells in the newer setting's column: they were made
    with the default, so a default run may extend it again and another value is refused, naming both."""
    base = {k: "x" for k in results_mod.RUN_SETTING_COLUMNS}
    rows = pd.DataFrame([{**base, "network": None, "rng": None}, {**base, "network": "eager", "rng": "torch"}])
    results_mod.check_run_settings(rows, {**base, "network": "eager", "rng": "torch"}, tmp_path)
    with pytest.raises(results_mod.IncompatibleResultsError, match=r"network: eager in the file vs compile now"):
        results_mod.check_run_settings(rows, {**base, "network": "compile", "rng": "torch"}, tmp_path)
    missing = pd.DataFrame([{k: "x" for k in results_mod.RUN_SETTING_COLUMNS if k != "rng"}])
    results_mod.check_run_settings(missing, {**base, "network": "x", "rng": "torch"}, tmp_path)
    with pytest.raises(results_mod.IncompatibleResultsError, match=r"rng: \(missing in the file\) vs 'philox'"):
        results_mod.check_run_settings(missing, {**base, "network": "x", "rng": "philox"}, tmp_path)


def test_thread_counts_come_from_the_column_or_the_old_device_name():
    assert results_mod.row_threads({"threads": 4.0, "device_name": "cpu (2 threads)"}) == 4
    assert results_mod.row_threads({"threads": None, "device_name": "AMD EPYC (2 threads)"}) == 2
    assert results_mod.row_threads({"threads": float("nan"), "device_name": "NVIDIA H200"}) is None
    assert results_mod.row_threads({}) is None


def _write(tmp_path, text):
    (tmp_path / results_mod.RESULTS_CSV).write_text(text, encoding="utf-8")


def _header_and_row(**values):
    cols = ["schema_version", "cell_key", "cell_id", "zeta", "alpha"]
    row = {"schema_version": results_mod.SCHEMA_VERSION, "cell_key": "k1", "cell_id": "ddim-s1", "zeta": 1,
           "alpha": 2, **values}
    return ",".join(cols) + "\n" + ",".join(str(row[c]) for c in cols) + "\n"


def test_load_results_reads_empty_header_only_and_cut_header_files(tmp_path):
    _write(tmp_path, "")
    assert results_mod.load_results(tmp_path).empty
    _write(tmp_path, "schema_ver")                      # cut inside the header: no row at all
    assert results_mod.load_results(tmp_path).empty
    _write(tmp_path, _header_and_row().splitlines()[0] + "\n")
    df = results_mod.load_results(tmp_path)
    assert df.empty and list(df.columns)[:2] == ["schema_version", "cell_key"]
    _write(tmp_path, "hello,world\n1,2\n")
    with pytest.raises(results_mod.IncompatibleResultsError, match="no schema_version column"):
        results_mod.load_results(tmp_path)
    _write(tmp_path, _header_and_row(schema_version=results_mod.SCHEMA_VERSION + 1))
    with pytest.raises(results_mod.IncompatibleResultsError, match=r"written with results schema version \d+; "
                                                                    r"this bench writes version"):
        results_mod.load_results(tmp_path)


def test_a_cut_row_is_named_by_its_id_or_key_and_quiet_says_nothing(tmp_path, capsys):
    full = _header_and_row()
    head = full.splitlines()[0] + "\n"
    for cut, name in ((full + "2,k2,ddim-s2,3", "ddim-s2"), (full + "2,k2", "k2"),
                      (full + "2", "unknown: cut before its id")):
        _write(tmp_path, cut)
        assert len(results_mod.load_results(tmp_path, quiet=True)) == 1
        assert capsys.readouterr().err == ""
        assert len(results_mod.load_results(tmp_path)) == 1
        err = capsys.readouterr().err
        assert err == (f"bench: {tmp_path / results_mod.RESULTS_CSV}: the last row (cell {name}) is incomplete — "
                       "the file ends inside it; it is not counted as done, is dropped at the next write, and "
                       "bench.run redoes that cell\n")
    _write(tmp_path, head + "2,k2,ddim-s2,3")
    assert results_mod.load_results(tmp_path, quiet=True).empty


def test_upsert_replaces_in_place_of_order_and_keeps_the_column_order():
    df = pd.DataFrame([{"cell_key": "a", "zeta": 1, "alpha": 1}, {"cell_key": "b", "zeta": 2, "alpha": 2}])
    out = results_mod.upsert_row(df, {"cell_key": "a", "zeta": 3, "alpha": 3, "beta": 0})
    assert list(out["cell_key"]) == ["b", "a"] and list(out.index) == [0, 1]
    assert list(out.columns) == ["cell_key", "zeta", "alpha", "beta"]
    assert results_mod.upsert_row(pd.DataFrame(), {"cell_key": "c"}).to_dict("records") == [{"cell_key": "c"}]


def test_recording_over_a_cut_row_says_nothing_and_drops_it(tmp_path, capsys):
    """record_row re-reads the file under the lock quietly (bench.run has already named the cut row)."""
    settings = {k: "x" for k in results_mod.RUN_SETTING_COLUMNS}

    def row(key):
        return {"schema_version": results_mod.SCHEMA_VERSION, "cell_key": key, "cell_id": f"id-{key}", **settings}

    results_mod.record_row(tmp_path, row("k1"), settings)
    path = tmp_path / results_mod.RESULTS_CSV
    path.write_text(path.read_text() + f"{results_mod.SCHEMA_VERSION},k2,id-k2,x", encoding="utf-8")
    capsys.readouterr()
    df = results_mod.record_row(tmp_path, row("k3"), settings)
    assert capsys.readouterr().err == ""
    assert list(df["cell_key"]) == ["k1", "k3"]
    assert list(results_mod.load_results(tmp_path)["cell_key"]) == ["k1", "k3"]


def test_header_edge_cases_and_the_mismatch_message_name_the_file(tmp_path):
    _write(tmp_path, "schema_version,cell_ke")            # cut inside the header, after its first name
    assert results_mod.load_results(tmp_path).empty
    _write(tmp_path, "hello,world\n")                     # a foreign header and no rows
    with pytest.raises(results_mod.IncompatibleResultsError, match="no schema_version column"):
        results_mod.load_results(tmp_path)
    path = tmp_path / results_mod.RESULTS_CSV
    path.unlink()
    settings = {k: "x" for k in results_mod.RUN_SETTING_COLUMNS}
    row = {"schema_version": results_mod.SCHEMA_VERSION, "cell_key": "k1", "cell_id": "id", **settings}
    results_mod.record_row(tmp_path, row, settings)
    with pytest.raises(results_mod.IncompatibleResultsError, match=rf"^{path} holds results made with other run"):
        results_mod.record_row(tmp_path, {**row, "cell_key": "k2"}, {**settings, "seed": "y"})


def test_refusal_messages_list_every_difference_in_full(tmp_path):
    """Two run settings differ (one of them over several values in the file), and both timing conditions:
    each message lists every difference, joined as written, and what to do."""
    base = {k: "x" for k in results_mod.RUN_SETTING_COLUMNS}
    rows = pd.DataFrame([{**base, "seed": 1, "dtype": "float32", "threads": 1, "batch_size": 20},
                         {**base, "seed": 2, "dtype": "float32", "threads": 2, "batch_size": 20}])
    path = tmp_path / results_mod.RESULTS_CSV
    with pytest.raises(results_mod.IncompatibleResultsError) as err:
        results_mod.check_run_settings(rows, {**base, "seed": 3, "dtype": "float64"}, tmp_path)
    assert str(err.value) == (f"{path} holds results made with other run settings (seed: 1, 2 in the file vs 3 now; "
                              "dtype: float32 in the file vs float64 now). One results directory holds one study; "
                              "it was not modified. Use another --out DIR (or move the old directory away).")
    same = {**base, "seed": 1, "dtype": "float32"}
    with pytest.raises(results_mod.IncompatibleResultsError) as err:
        results_mod.check_run_settings(rows[:1], {**same, "threads": 4, "batch_size": 40}, tmp_path)
    assert str(err.value) == (f"{path} holds cells timed under other conditions (--threads 1 in the file vs 4 now; "
                              "--batch-size 20 in the file vs 40 now): wall-clock from different thread counts or "
                              "batch sizes is not comparable, so one results directory does not mix them; it was "
                              "not modified. Rerun with the same values (--threads 1 --batch-size 20) or use "
                              "another --out DIR.")
    with pytest.raises(results_mod.IncompatibleResultsError, match=r"\(--threads 1, 2 in the file vs 4 now\).*"
                                                                   r"same values \(--threads \(one of 1, 2\)\)"):
        results_mod.check_run_settings(rows.assign(seed=1), {**same, "threads": 4, "batch_size": 20}, tmp_path)


def test_a_missing_setting_column_does_not_hide_a_later_difference(tmp_path):
    """A file without the newer `network` column (read as its default) is still checked on every later
    setting (rng) and on the timing conditions."""
    base = {k: "x" for k in results_mod.RUN_SETTING_COLUMNS if k != "network"}
    rows = pd.DataFrame([{**base, "rng": "torch", "threads": 1, "batch_size": 20}])
    with pytest.raises(results_mod.IncompatibleResultsError, match=r"rng: torch in the file vs philox now"):
        results_mod.check_run_settings(rows, {**base, "network": "eager", "rng": "philox"}, tmp_path)
    with pytest.raises(results_mod.IncompatibleResultsError, match=r"--batch-size 20 in the file vs 40 now"):
        results_mod.check_run_settings(rows, {**base, "network": "eager", "rng": "torch", "threads": None,
                                              "batch_size": 40}, tmp_path)


def test_a_new_row_has_every_column_with_the_measured_ones_unset():
    """results.new_row is the one place a row's columns are made: identity and settings filled, every
    measurement NaN (or 0 passes), one metric column per metric, provenance last."""
    from types import SimpleNamespace
    cell = SimpleNamespace(key="k", cell_id="ddim-s2", solver="ddim", label="ddim", options={"eta": 0.0},
                           deterministic=True, steps=2, spacing="uniform", spacing_note="", grid=[1.0, 0.5, 0.0],
                           nfe_declared=2)
    settings = {"model_options": "{}", "dtype": "float64", "device_type": "cpu", "metrics": "fd_data",
                "network": "eager", "rng": "torch", "threads": 2}
    run = {"num_samples": 10, "batch_size": 5, "seed": 0, "device": "cpu", "world_size": 1, "reference_size": 10}
    row = results_mod.new_row(cell, model="gmm2d", model_kind="analytic", reference="exact", changed_options={},
                              run=run, settings=settings, metric_labels={"fd_data": "FD"},
                              env={"hostname": "h"}, command="cmd", started="t0")
    assert (row["schema_version"], row["cell_key"], row["status"], row["t_start"], row["t_last_level"],
            row["t_end"]) == (results_mod.SCHEMA_VERSION, "k", "ok", 1.0, 0.5, 0.0)
    assert row["threads"] == 2 and row["batch_size"] == 5 and row["solver_options"] == '{"eta": 0.0}'
    for k in ("nfe", "time_total_s", "time_model_s", "time_solver_s", results_mod.METRIC_PREFIX + "fd_data"):
        assert row[k] != row[k], f"{k} must start as NaN"
    assert row["time_repeats"] == 0 and row["metric_labels"] == '{"fd_data": "FD"}'
    assert list(row)[-3:] == ["hostname", "started_at", "command"]


# -- a refused run writes nothing ----------------------------------------------------------------------------------
def test_a_run_refused_at_its_first_row_leaves_the_reference_data_and_previews_untouched(tmp_path, monkeypatch,
                                                                                          capsys):
    """Run B checks an empty folder, then, while it prepares its references, run A (another seed) records its
    rows there: B's first row is refused, and A's reference.json and previews are as A wrote them."""
    from bench import sweep as sweep_mod
    first = tmp_path / "a"
    args = [*SMALL, "--solvers", "ddim", "--steps", "1"]
    assert _bench(first, *args) == 0
    out = tmp_path / "b"
    real = sweep_mod.prepare_references

    def prepare_while_a_writes(*a, **kw):
        real(*a, **kw)
        import shutil
        shutil.copytree(first, out, dirs_exist_ok=True)

    monkeypatch.setattr(sweep_mod, "prepare_references", prepare_while_a_writes)
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _bench(out, *args, "--seed", "1", "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "seed: 0 in the file vs 1 now" in err and err.count("\n") == 1, err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # reference.json, the previews and the results as run A wrote them; nothing of B's
