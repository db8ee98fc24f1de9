"""The OpenAI-compatible server, started as a user starts it, on a checkpoint the test trains itself."""
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from dsmoe.infer import SamplingParams, generate
from dsmoe.checkpoint.load import load_model
from dsmoe.infer.seeds import prompt_seed
from dsmoe.infer.process import served

MAX_BATCH = 8  # fewer rows than the 16 concurrent requests: half of them wait and join between steps


@pytest.fixture(scope="module")
def ckpt(trained_checkpoint):
    return trained_checkpoint


@pytest.fixture(scope="module")
def server(ckpt):
    with served(ckpt, "--max-batch", str(MAX_BATCH), env={"OMP_NUM_THREADS": "1"}) as url:
        yield url


def complete(url, **body):
    r = requests.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream(url, **body):
    """(text pieces, finish reason, usage, whether [DONE] ended it)."""
    pieces, finish, usage, done = [], None, None, False
    with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines(decode_unicode=True):
            if not line:
                continue
            assert line.startswith("data: ") and not done
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            usage = event.get("usage", usage)
            for choice in event["choices"]:
                pieces.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return pieces, finish, usage, done


def health(url):
    return requests.get(f"{url}/health", timeout=30).json()


def test_models_health_and_completion_equal_the_engine(server, ckpt):
    models = requests.get(f"{server}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == 256
    assert health(server)["status"] == "ok" and health(server)["slots"] == MAX_BATCH
    out = complete(server, model="tiny", prompt="ROMEO:", max_tokens=24, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    model, tok, _ = load_model(ckpt, device="cpu")
    ref = generate(model, ["ROMEO:"], SamplingParams(max_new_tokens=24, temperature=0.9, top_k=20, top_p=0.9,
                                                   seed=prompt_seed(3, 0)),
                   tok)[0]
    choice = out["choices"][0]
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert choice["text"] == ref.text and choice["finish_reason"] == ref.finish_reason
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": len(ref.out), "total_tokens": 6 + len(ref.out)}


def test_streaming_equals_the_whole_answer(server):
    body = dict(prompt="JULIET:", max_tokens=30, temperature=1.0, top_k=30, seed=5)
    whole = complete(server, **body)
    pieces, finish, usage, done = stream(server, **body, stream_options={"include_usage": True})
    assert done and len([p for p in pieces if p]) > 1
    assert "".join(pieces) == whole["choices"][0]["text"]
    assert finish == whole["choices"][0]["finish_reason"] and usage == whole["usage"]


def test_stop_string(server):
    body = dict(prompt="KING:", max_tokens=40, temperature=0)
    text = complete(server, **body)["choices"][0]["text"]
    stop = next(text[i:i + 2] for i in range(3, len(text)) if "\ufffd" not in text[i:i + 2])
    out = complete(server, **body, stop=[stop])["choices"][0]
    assert out["text"] == text[:text.find(stop)] and out["finish_reason"] == "stop"


@pytest.mark.parametrize("raw, param", [
    ('{"prompt": "' + "a" * 300 + '"}', "prompt"),  # longer than the 256-token context
    ('{"prompt": "a", "max_tokens": 256}', "max_tokens"),  # prompt + max_tokens past the context
    ('{"prompt": "a", "max_tokens": 0}', "max_tokens"),
    ('{"prompt": "a", "temperature": -0.1}', "temperature"),
    ('{"prompt": "a", "top_p": 0}', "top_p"),
    ('{"prompt": "a", "max_tokens": "8"}', "max_tokens"),  # wrong types
    ('{"prompt": 7}', "prompt"),
    ('{"prompt": "a", "stream": "yes"}', "stream"),
    ('{"prompt": "a", "seed": 1.5}', "seed"),
    ('{"prompt": "a", "stop": [1]}', "stop"),
    ('{"max_tokens": 4}', "prompt"),
    ('{"prompt": "a", "max_tokens": 4', "body"),  # malformed JSON
    ('[1, 2]', "body"),
])
def test_bad_requests_name_the_field(server, raw, param):
    r = requests.post(f"{server}/v1/completions", data=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert health(server)["status"] == "ok"


def test_unknown_model_is_404(server):
    r = requests.post(f"{server}/v1/completions", json={"prompt": "a", "model": "gpt-4"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_concurrent_requests_each_equal_the_request_alone(server):
    bodies = [dict(prompt=f"{name}:", max_tokens=8 + 3 * i, temperature=[0, 0.7, 1.0, 1.3][i % 4], top_k=[0, 40][i % 2],
                   top_p=[1.0, 0.9][i // 8], seed=100 + i, stop=["\n\n"] if i % 5 == 0 else None)
              for i, name in enumerate(["ROMEO", "JULIET", "KING", "QUEEN"] * 4)]
    alone = [complete(server, **b)["choices"][0] for b in bodies]
    peak_before = health(server)["peak_batch"]
    with ThreadPoolExecutor(len(bodies)) as pool:  # half of them stream
        together = list(pool.map(lambda ib: complete(server, **ib[1])["choices"][0] if ib[0] % 2 else
                                 stream(server, **ib[1]), enumerate(bodies)))
    for i, (a, t) in enumerate(zip(alone, together)):
        if i % 2:
            assert (t["text"], t["finish_reason"]) == (a["text"], a["finish_reason"]), bodies[i]
        else:
            assert ("".join(t[0]), t[1]) == (a["text"], a["finish_reason"]), bodies[i]
    h = health(server)
    assert h["peak_batch"] > max(peak_before, 1) and h["running"] == 0 and h["waiting"] == 0


def test_disconnect_mid_stream_frees_the_slot(server):
    before = health(server)["finished"].get("cancelled", 0)
    with requests.post(f"{server}/v1/completions", stream=True, timeout=60,
                       json={"prompt": "a", "max_tokens": 250, "temperature": 1.0, "stream": True}) as r:
        first = next(line for line in r.iter_lines() if line)
        assert first.startswith(b"data: ")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        h = health(server)
        if h["running"] == 0 and h["finished"].get("cancelled", 0) == before + 1:
            break
        time.sleep(0.05)
    assert h["running"] == 0 and h["finished"].get("cancelled", 0) == before + 1, h
    assert complete(server, prompt="a", max_tokens=3)["choices"][0]["finish_reason"] == "length"


CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no browser: chromium and chromium-driver are not installed "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
def test_page_streams_a_completion_in_a_real_browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="dsmoe-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.get(server + "/")
        settings = {"max_tokens": "40", "temperature": "0.8", "top_p": "1", "top_k": "20", "seed": "11"}
        for field, value in settings.items():
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "prompt").send_keys("ROMEO:")
        driver.find_element(By.ID, "generate").click()
        stats = driver.find_element(By.ID, "stats")
        WebDriverWait(driver, 120).until(lambda d: stats.get_attribute("data-state") == "done")
        shown = driver.find_element(By.ID, "completion").get_attribute("textContent")
        summary = stats.text
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    expected = complete(server, prompt="ROMEO:", max_tokens=40, temperature=0.8, top_p=1.0, top_k=20, seed=11)
    assert shown == expected["choices"][0]["text"] and shown
    assert "tokens/s" in summary and int(summary.split(" chunks")[0].split()[-1]) > 1, summary
