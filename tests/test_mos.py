"""The MOS study (paper §7.2): items, ratings, aggregation with its confidence interval, the server's checks."""

import csv
import json
import math
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from dladiff.errors import InputError
from dladiff.evaluate import mos
from dladiff.evaluate.cache import prompt_slug
from dladiff.rate_server import RatingSession, make_server, url_of

PROMPT = "a photo of sks person"


def write_evaluation(folder, method, identities=("id1", "id2"), images=3, dataset="CelebA-HQ"):
    """A results.json and generated images in the layout of `dladiff evaluate`."""
    rows = []
    for identity in identities:
        for attack in ("dreambooth", "faceid"):
            rows.append({"dataset": dataset, "method": method, "identity": identity, "attack": attack, "model": "m", "prompt": PROMPT})
            target = folder / identity / attack / prompt_slug(PROMPT)
            target.mkdir(parents=True)
            for k in range(images):
                shade = 20 + 60 * k + (30 if method == "Ours" else 0) + (10 if identity == "id2" else 0)
                Image.fromarray(np.full((16, 16, 3), shade, np.uint8)).save(target / f"{k:04d}.png")
    for attack in ("dreambooth", "faceid"):
        rows.append({"dataset": dataset, "method": method, "identity": "ALL", "attack": attack, "model": "m", "prompt": PROMPT, "fdr": 0.5})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"dataset": dataset, "method": method, "rows": rows}))


@pytest.fixture()
def study_dir(tmp_path):
    root = tmp_path / "study"
    write_evaluation(root / "ours", "Ours")
    write_evaluation(root / "mist", "MIST")
    return root


def test_mean_ci_matches_the_hand_computed_t_interval():
    # scores 1..5: mean 3, s = sqrt(10/4) = 1.5811, s/√5 = 0.70711, t(0.975, 4) = 2.776445 -> 1.96324
    mean, half = mos.mean_ci([1, 2, 3, 4, 5])
    assert mean == 3.0 and half == pytest.approx(1.96324, abs=1e-5)
    # scores 2,2,3,5: mean 3, s = sqrt(6/3) = 1.41421, s/2 = 0.70711, t(0.975, 3) = 3.182446 -> 2.25033
    assert mos.mean_ci([2, 2, 3, 5]) == pytest.approx((3.0, 2.25033), abs=1e-5)
    assert mos.mean_ci([4])[0] == 4.0 and math.isnan(mos.mean_ci([4])[1])


def test_study_items_are_blinded_sampled_and_fixed(study_dir):
    study = mos.open_study(study_dir)
    assert len(study.items) == 2 * 2 * 3  # two methods x two identities x 3 images, dreambooth only
    assert {i["method"] for i in study.items.values()} == {"Ours", "MIST"}
    assert all(len(i) == 8 and set(i) <= set("0123456789abcdef") for i in study.items)
    again = mos.open_study(study_dir)
    assert again.items == study.items  # ids never change once written
    with pytest.raises(InputError, match="was built with"):
        mos.open_study(study_dir, per_group=1)
    sampled = mos.sample_images(mos.discover_images(study_dir, ["dreambooth"]), 2, seed=0)
    assert len(sampled) == 4 and len({mos.group_of(i) for i in sampled}) == 2


def test_missing_study_inputs_are_clear(tmp_path, study_dir):
    with pytest.raises(InputError, match="choose from"):
        mos.open_study(study_dir, ["dreambooht"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no generated images"):
        mos.open_study(tmp_path / "empty")
    with pytest.raises(InputError, match="no such folder"):
        mos.open_study(tmp_path / "nope")


def test_rater_order_is_a_stored_per_rater_shuffle(study_dir):
    study = mos.open_study(study_dir)
    first = mos.order_for(study, "alice")
    assert sorted(first) == sorted(study.items) and first == mos.rater_order(study.items, "alice", 0)
    assert mos.order_for(study, "bob") != first
    methods = [study.items[i]["method"] for i in first]
    assert methods != sorted(methods) and methods != sorted(methods, reverse=True)  # methods are mixed
    stored = json.loads((study_dir / mos.ITEMS_FILE).read_text())["orders"]
    assert stored["alice"] == first and stored["bob"] == mos.order_for(mos.open_study(study_dir), "bob")
    with pytest.raises(InputError, match="rater id"):
        mos.order_for(study, "../evil")


def test_ratings_append_and_malformed_lines_are_left_out(study_dir):
    item = next(iter(mos.open_study(study_dir).items))
    mos.append_rating(study_dir, "alice", item, 4)
    mos.append_rating(study_dir, "alice", item, 2)
    with (study_dir / mos.RATINGS_FILE).open("a") as handle:
        handle.write("alice,xyz,9,2026\nbob,cut")
    rows = mos.read_ratings(study_dir / mos.RATINGS_FILE)
    assert [(r["rater"], r["item"], r["score"]) for r in rows] == [("alice", item, 4), ("alice", item, 2)]
    assert rows[0]["time"].endswith("+00:00")
    assert mos.rated_items(study_dir, "alice") == {item} and mos.rated_items(study_dir, "bob") == set()
    with pytest.raises(InputError, match="score"):
        mos.append_rating(study_dir, "alice", item, 6)


def test_mos_per_method_from_two_raters_files(study_dir, tmp_path, caplog):
    study = mos.open_study(study_dir)
    ours = sorted(i for i, it in study.items.items() if it["method"] == "Ours")
    mist = sorted(i for i, it in study.items.items() if it["method"] == "MIST")
    for item, score in zip(ours, [1, 2, 3, 4, 5, 3]):
        mos.append_rating(study_dir, "alice", item, score)
    mos.append_rating(study_dir, "alice", mist[0], 5)
    mos.append_rating(study_dir, "alice", mist[0], 4)  # a re-rating: the last one counts
    copy = tmp_path / "copy"  # a second rater's copy of the study folder
    copy.mkdir()
    (copy / mos.ITEMS_FILE).write_bytes((study_dir / mos.ITEMS_FILE).read_bytes())
    mos.append_rating(copy, "bob", mist[1], 2)
    mos.append_rating(copy, "alice", ours[0], 1)  # the same rater id in a second file: warned about, counts once
    with caplog.at_level("WARNING", logger="dladiff"):
        table = mos.mos_by_group([study_dir / mos.RATINGS_FILE, copy, study_dir])
    assert "rater alice has ratings in 2 files" in caplog.text
    key_ours, key_mist = ("CelebA-HQ", "Ours", "dreambooth", PROMPT), ("CelebA-HQ", "MIST", "dreambooth", PROMPT)
    # Ours: 1,2,3,4,5,3 -> mean 3, s = sqrt(10/5) = 1.41421, s/√6 = 0.57735, t(0.975, 5) = 2.570582 -> 1.48413
    assert table[key_ours].mean == 3.0 and table[key_ours].half_width == pytest.approx(1.48413, abs=1e-5)
    assert (table[key_ours].n, table[key_ours].raters) == (6, 1)
    # MIST: 4 (alice, last of two) and 2 (bob): mean 3, s = 1.41421, s/√2 = 1, t(0.975, 1) = 12.7062
    assert (table[key_mist].n, table[key_mist].raters) == (2, 2)
    assert table[key_mist].half_width == pytest.approx(12.7062, abs=1e-4)


def test_evaluate_tables_fills_the_mos_column(study_dir, tmp_path):
    from typer.testing import CliRunner

    from dladiff.cli import app

    study = mos.open_study(study_dir)
    for item, it in study.items.items():
        mos.append_rating(study_dir, "alice", item, 2 if it["method"] == "Ours" else 4)
    out = tmp_path / "tables.md"
    result = CliRunner().invoke(app, ["evaluate-tables", str(study_dir / "mist"), str(study_dir / "ours"), "--out", str(out),
                                      "--ratings", str(study_dir / mos.RATINGS_FILE)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    table1 = text.split("### Table 1")[1].split("###")[0]
    assert "| MOS |" in table1.splitlines()[2]
    lines = {line.split("|")[2].strip(): line.split("|")[-2].strip() for line in table1.splitlines() if line.startswith("| CelebA")}
    assert lines == {"MIST": "4.00 ± 0.00", "Ours": "2.00 ± 0.00"}
    assert "6 ratings by 1 rater(s)" in text and "t-interval over all ratings" in text
    missing = CliRunner().invoke(app, ["evaluate-tables", str(study_dir / "ours"), "--out", str(out), "--ratings", str(tmp_path)])
    assert missing.exit_code == 2 and "ratings.csv" in missing.output


@pytest.fixture()
def served(study_dir):
    session = RatingSession.start(mos.open_study(study_dir), "alice")
    server = make_server(session, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield session, url_of(server)
    server.shutdown()
    server.server_close()


def request(url, data=None, headers=None, method=None):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_server_checks_every_request(served, study_dir):
    session, url = served
    status, page, headers = request(url)
    assert status == 200 and b"http://" not in page and b"https://" not in page  # nothing remote
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    for text in mos.CRITERIA.values():
        assert text.encode() in page
    state = json.loads(request(url + "api/state")[1])
    assert state["position"] == 1 and state["total"] == 12 and state["item"] == session.order[0]
    item = state["item"]
    status, image, headers = request(url + "image/" + item)
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert image == (study_dir / session.study.items[item]["file"]).read_bytes()
    for bad in ("image/..%2f..%2fresults.json", "image/../mist/results.json", "image/zzzz", "rating_items.json", "ratings.csv"):
        assert request(url + bad)[0] == 404, bad
    assert request(url + "api/rate", {"token": "wrong", "item": item, "score": 3})[0] == 403
    assert request(url + "api/rate", {"token": session.token, "item": item, "score": 6})[0] == 400
    assert request(url + "api/rate", {"token": session.token, "item": item, "score": True})[0] == 400
    assert request(url + "api/rate", {"token": session.token, "item": session.order[1], "score": 3})[0] == 409
    assert request(url + "api/rate", {"token": session.token, "item": item, "score": 3}, {"Content-Type": "text/plain"})[0] == 415
    assert request(url + "api/state", headers={"Host": "evil.example:80"})[0] == 421
    assert not (study_dir / mos.RATINGS_FILE).exists()
    status, body, _ = request(url + "api/rate", {"token": session.token, "item": item, "score": 3})
    assert status == 200 and json.loads(body)["state"]["position"] == 2
    assert request(url + "api/rate", {"token": session.token, "item": item, "score": 3})[0] == 409  # no double rating
    with (study_dir / mos.RATINGS_FILE).open() as handle:
        assert [(r["rater"], r["item"], r["score"]) for r in csv.DictReader(handle)] == [("alice", item, "3")]


def test_rate_command_serves_until_ctrl_c(study_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from dladiff.cli import app; app()", "rate", str(study_dir), "--port", "0", "--rater", "carol", "--sample", "2"]
    # A harness that runs the suite in the background hands its children SIGINT ignored (a shell's `&` does);
    # Ctrl-C in a terminal is SIG_DFL, which Python turns into KeyboardInterrupt: give the child that.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.getcwd(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert "rating page for carol: http://127.0.0.1:" in line and "0 of 4 rated" in line
        url = line.split(": ", 1)[1].split()[0]
        state = json.loads(request(url + "api/state")[1])
        assert state["total"] == 4 and state["rater"] == "carol"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped; ratings are in" in out
    settings = json.loads((study_dir / mos.ITEMS_FILE).read_text())["settings"]
    assert settings == {"attacks": ["dreambooth", "lora"], "sample": 2, "seed": 0}


@pytest.mark.parametrize("case", ["empty", "rater"])
def test_rate_command_errors_are_clear(tmp_path, study_dir, case):
    from typer.testing import CliRunner

    from dladiff.cli import app

    args = [str(tmp_path / "empty")] if case == "empty" else [str(study_dir), "--rater", "a b"]
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["rate", *args])
    assert result.exit_code == 2
    assert ("no generated images" if case == "empty" else "rater id") in result.output
