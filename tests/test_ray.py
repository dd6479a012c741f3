"""aad_fast.jobs.ray_data / ``generate --ray`` / ``make-pairs --ray`` on a local Ray instance (CPU):
the same rows as the single-process commands, every id exactly once after a killed driver or
a killed worker, bad input named by row."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'aad_fast[ray]')")
pytest.importorskip("ray.data", reason="ray without Ray Data (pip install 'ray[data]')")

from aad_fast.jobs import ray_data  # noqa: E402
from aad_fast.cli import main  # noqa: E402
from aad_fast.toy import task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAIR = str(ROOT / "aad_fast" / "default_pair" / "dpo")
TIME_LIMIT = 240  # seconds per test: a hung cluster fails the test instead of the CI job


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    # start every worker before the first batch, so that "2 workers" is what ran
    ray.data.DataContext.get_current().wait_for_min_actors_s = 180
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(autouse=True)
def bounded():
    def stop(*_):
        raise TimeoutError(f"test ran past {TIME_LIMIT} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(TIME_LIMIT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    held_out = task.split_problems()[1][:40]
    path.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in held_out))
    return path


def gen_args(prompts, out):
    args = ["generate", "--aligned", PAIR, "--prompts-file", str(prompts), "--out", str(out),
            "--chat", "--max-new-tokens", "6", "--batch-size", "2"]
    return args


@pytest.fixture(scope="module")
def single(prompts, tmp_path_factory):
    """What the single-process ``generate --out`` writes."""
    out = tmp_path_factory.mktemp("single") / "out.jsonl"
    assert main(gen_args(prompts, out)) == 0
    return out.read_text()


def ids_of(path):
    return [json.loads(line)["id"] for line in Path(path).read_text().splitlines()]


def test_two_workers_same_rows_as_single_process(cluster, prompts, single, tmp_path, capsys):
    out, pq = tmp_path / "ray.jsonl", tmp_path / "ray.parquet"
    assert main(gen_args(prompts, out) + ["--ray", "--workers", "2", "--parquet", str(pq)]) == 0
    assert out.read_text() == single  # row for row, in id order
    assert "on 2 worker(s)" in capsys.readouterr().err
    import pandas as pd
    want = [json.loads(line) for line in single.splitlines()]
    got = pd.read_parquet(pq).to_dict("records")
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [list(r["tokens"]) for r in got] == [r["tokens"] for r in want]
    meta = json.loads((tmp_path / "ray.jsonl.meta.json").read_text())
    assert meta["settings"]["command"] == "generate"  # the single-process sidecar: resumable


def test_killed_driver_rerun_gives_every_id_once(cluster, prompts, single, tmp_path, capsys):
    out = tmp_path / "ray.jsonl"
    # the first generate call's rows come back, every later call is held: a kill midway
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               AAD_FAST_RAY_FAULT=f"stall:{tmp_path / 'first-done'}")
    proc = subprocess.Popen([sys.executable, "-m", "aad_fast.cli", *gen_args(prompts, out),
                             "--ray", "--workers", "2", "--ray-address", cluster],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1:
            time.sleep(1.0)  # the first call's rows are written one by one
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    before = out.read_text().count("\n")
    assert 1 <= before < 40, "the driver was to be killed midway"
    with open(out, "a") as f:  # and a row torn by the kill
        f.write('{"id": 39, "prompt": "cut')
    assert main(gen_args(prompts, out) + ["--ray", "--workers", "2"]) == 0
    assert f"{before} prompt(s) already done, {40 - before} to go" in capsys.readouterr().err
    assert sorted(ids_of(out)) == list(range(40))
    assert out.read_text() == single


def test_killed_worker_gives_every_id_once(cluster, prompts, single, tmp_path, monkeypatch):
    flag = tmp_path / "fault-fired"
    monkeypatch.setenv(ray_data.FAULT_ENV, f"exit:{flag}")
    out = tmp_path / "ray.jsonl"
    assert main(gen_args(prompts, out) + ["--ray", "--workers", "2"]) == 0
    assert flag.exists()  # a worker did die mid-batch
    assert ids_of(out) == list(range(40))
    assert out.read_text() == single


def test_make_pairs_ray_same_rows(cluster, tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("".join(x.prompt + "\n" for x in task.split_problems()[0][:6]))
    args = ["make-pairs", "--prompts", str(p), "--max-new-tokens", "5", "--batch-size", "4",
            "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "one.jsonl")]) == 0
    assert main(args + ["--out", str(tmp_path / "ray.jsonl"), "--ray", "--workers", "2"]) == 0
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()


def test_bad_rows_fail_naming_the_row(cluster):
    dec = {"aligned": PAIR, "max_batch_size": 4, "max_seq_len": 64}
    rows = [{"id": "a", "prompt": "what is 2 plus 3 ?"}, {"id": "b", "prompt": "hi", "alpha": 2.0}]
    with pytest.raises(ValueError, match=r"row id 'b'.*alpha"):
        ray_data.generate(rows, decoder=dec, rule=ray_data.AAD(0.1), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"row id 7: 'prompt' must be a non-empty string"):
        ray_data.generate([{"id": 7, "text": "no prompt"}], decoder=dec, max_new_tokens=4)
    # the same checks on the workers, for a Dataset built elsewhere
    ds = ray.data.from_items([{"id": 1, "prompt": "what is 2 plus 3 ?", "alpha": 0.1},
                              {"id": 2, "prompt": "hi", "alpha": -1.0}])
    mapped = ray_data.generate(ds, decoder=dec, max_new_tokens=4, chat=True, workers=1)
    with pytest.raises(Exception, match=r"row id 2.*alpha"):
        mapped.take_all()


def test_per_row_parameters_and_timing(cluster):
    dec = {"aligned": PAIR, "max_batch_size": 4, "max_seq_len": 64}
    prompts = [p.prompt for p in task.split_problems()[1][:3]]
    rows = [{"id": i, "prompt": p, "alpha": a} for i, (p, a) in enumerate(zip(prompts,
                                                                            (0.1, 0.5, 0.1)))]
    got = ray_data.generate(rows, decoder=dec, max_new_tokens=5, chat=True, workers=1)
    from aad_fast import AAD, Decoder
    with Decoder(PAIR, max_batch_size=4, max_seq_len=64) as d:
        for r in got:
            want = d.generate([r["prompt"]], rule=AAD(r["alpha"]), max_new_tokens=5, chat=True)
            assert r["tokens"] == want.tokens[0] and r["completion"] == want.text[0]
            assert r["finish_reason"] == want.finish_reason[0]
    assert [r["id"] for r in got] == [0, 1, 2]
    assert all(r["batch_ms"] > 0 and r["worker"] for r in got)


def test_ray_flag_without_ray_says_how_to_install(monkeypatch, prompts, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "aad_fast.jobs.ray_data", None)  # as if ray were missing
    with pytest.raises(SystemExit, match=r"pip install 'aad_fast\[ray\]'"):
        main(gen_args(prompts, tmp_path / "o.jsonl") + ["--ray"])


def test_rows_of_a_retried_task_are_written_once(cluster, tmp_path, monkeypatch):
    """A task that Ray reruns after it already returned rows: the writer keeps the first."""
    def fake_worker(batch):
        out = batch.copy()
        out["completion"], out["tokens"] = "x", [[5, 6]] * len(out)
        out["finish_reason"], out["worker"] = "length", "w"
        return out.drop(columns=["_batch"])

    def twice(ds, worker, **kw):  # every block comes back two times
        mapped = ds.map_batches(fake_worker, batch_format="pandas", batch_size=None)
        return mapped.union(mapped)
    monkeypatch.setattr(ray_data, "map_dataset", twice)
    rows = [{"id": i, "prompt": f"p{i}"} for i in range(6)]
    groups = [[{"_pos": i, "prompt": rows[i]["prompt"]} for i in (j, j + 1)] for j in (0, 2, 4)]
    from aad_fast.jobs.outfile import ResultsFile
    with ResultsFile(tmp_path / "o.jsonl", {"x": 1}, {"y": 1}) as out:
        stats = ray_data.run_rows(rows, groups, lambda r, rec: {"id": r["id"],
                                                                "tokens": list(rec["tokens"])},
                                  out=out, workers=1)
        ray_data.sort_file(out, rows)
    assert stats["duplicates"] == 6 and stats["rows"] == 6
    assert ids_of(tmp_path / "o.jsonl") == list(range(6))


def test_bench_runs_end_to_end(cluster, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_ray", ROOT / "bench" / "bench_ray.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([str(tmp_path), "--prompts", "4", "--max-new-tokens", "3",
                       "--batch-size", "2"]) == 0
    res = json.loads(next(tmp_path.glob("ray-cpu-*.json")).read_text())
    assert res["same_tokens"] and res["ray"]["workers_used"] == 2
    assert res["single"]["tokens"] == res["ray"]["tokens"] > 0


def test_helper_writes_a_resumable_file(cluster, tmp_path, capsys):
    dec = {"aligned": PAIR, "max_batch_size": 4, "max_seq_len": 64}
    rows = [{"id": f"q{i}", "prompt": p.prompt} for i, p in enumerate(task.split_problems()[1][:4])]
    out = tmp_path / "o.jsonl"
    kw = dict(decoder=dec, max_new_tokens=4, chat=True, batch_size=2, workers=1)
    first = ray_data.generate(rows[2:], out, **kw)
    assert "ray: 2 rows" in capsys.readouterr().err
    got = ray_data.generate(rows, out, **kw)
    assert "ray: 2 rows" in capsys.readouterr().err  # only the missing ids were sent
    assert [r["id"] for r in got] == ["q0", "q1", "q2", "q3"] == ids_of(out)
    assert got[2:] == first
    with pytest.raises(ValueError, match="other settings"):
        ray_data.generate(rows, out, **dict(kw, max_new_tokens=5))
