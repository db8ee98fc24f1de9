"""Real clients against the server, started as a user starts it: the OpenAI Python client (completions, chat,
streaming, logprobs), lm-evaluation-harness (`local-completions` on the server against `hf` on the exported
directory), and bad requests that each fail alone while a stream is in flight."""
import json
import os

import pytest
import requests
import torch

from dsmoe.infer import SamplingParams, generate
from dsmoe.infer.seeds import prompt_seed
from dsmoe.infer.chat import render_chat
from dsmoe.infer.forward import dropless
from dsmoe.checkpoint.load import load_model
from dsmoe.infer.process import served

openai = pytest.importorskip("openai")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(trained_checkpoint):
    return trained_checkpoint


@pytest.fixture(scope="module")
def server(ckpt):
    with served(ckpt, "--max-batch", "8", "--prefill-chunk", "16", env={"OMP_NUM_THREADS": "1"}) as url:
        yield url


@pytest.fixture(scope="module")
def engine(ckpt):
    return load_model(ckpt, device="cpu")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@torch.no_grad()
def logprobs_of(model, ids):
    """[len(ids) - 1] log-probabilities of ids[1:] under one full forward (the uncached reference)."""
    with dropless(model):
        logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_completions_with_logprobs_and_echo_equal_the_engine(client, engine):
    model, tok, _ = engine
    out = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0, logprobs=3, echo=True)
    ref = generate(model, ["ROMEO:"], SamplingParams(max_new_tokens=12, temperature=0), tok)[0]
    choice = out.choices[0]
    assert choice.text == "ROMEO:" + ref.text and choice.finish_reason == ref.finish_reason
    prompt = tok.encode("ROMEO:")
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(prompt) + len(ref.out)
    want = logprobs_of(model, prompt + ref.out)
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-4
    for got, top in zip(lp.token_logprobs[len(prompt):], lp.top_logprobs[len(prompt):]):
        assert len(top) == 3 and abs(max(top.values()) - got) < 1e-6  # greedy: the chosen token is the top one
    assert "".join(lp.tokens) == choice.text and lp.text_offset[:2] == [0, 1]


def test_streaming_completions_and_prompt_forms(client):
    body = dict(model="tiny", max_tokens=20, temperature=0.9, seed=4)
    whole = client.completions.create(prompt="KING:", **body).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(prompt="KING:", stream=True, **body)]
    assert "".join(pieces) == whole and len(pieces) > 2
    scored = client.completions.create(prompt="KING:", logprobs=2, echo=True, **body).choices[0].logprobs
    streamed = [c.choices[0].logprobs for c in client.completions.create(prompt="KING:", stream=True, logprobs=2,
                                                                         echo=True, **body)]
    assert sum((lp.tokens for lp in streamed), []) == scored.tokens
    assert sum((lp.token_logprobs for lp in streamed), []) == scored.token_logprobs
    ids = list("KING:".encode())
    many = client.completions.create(prompt=["KING:", "QUEEN:"], **body).choices
    assert [c.index for c in many] == [0, 1] and many[0].text == whole
    assert client.completions.create(prompt=ids, **body).choices[0].text == whole
    same_twice = client.completions.create(prompt=[ids, ids], **body).choices  # prompt k draws prompt_seed(s, k)
    assert same_twice[0].text == whole and same_twice[1].text != whole
    two = client.completions.create(prompt="KING:", n=2, **body).choices  # choice j of one prompt: the same rule
    assert two[0].text == whole and two[1].text == same_twice[1].text


def test_penalties_and_logit_bias_equal_the_engine(client, engine):
    model, tok, _ = engine
    settings = dict(presence_penalty=1.5, frequency_penalty=0.7, logit_bias=((ord("e"), 3.0), (ord(" "), -5.0)))
    params = SamplingParams(max_new_tokens=24, temperature=0.8, seed=prompt_seed(9, 0), **settings)
    ref = generate(model, ["ROMEO:"], params, tok)[0]
    out = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=24, temperature=0.8, seed=9,
                                    presence_penalty=1.5, frequency_penalty=0.7,
                                    logit_bias={str(ord("e")): 3.0, str(ord(" ")): -5.0}).choices[0]
    plain = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=24, temperature=0.8, seed=9).choices[0]
    assert out.text == ref.text and out.text != plain.text and " " not in out.text
    forced = client.completions.create(model="tiny", prompt="a", max_tokens=5, temperature=0,
                                       logit_bias={str(ord("z")): 100}).choices[0].text
    assert forced == "zzzzz"


def test_chat_plain_and_streaming_through_the_template(client, engine):
    model, tok, _ = engine
    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who goes there?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                         logprobs=True, top_logprobs=2)
    ref = generate(model, [tok.encode(render_chat(messages))], SamplingParams(max_new_tokens=16, temperature=0), tok)[0]
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == ref.text and out.usage.prompt_tokens == len(tok.encode(render_chat(messages)))
    assert len(choice.logprobs.content) == len(ref.out) + (ref.finish_reason == "stop")
    assert all(len(t.top_logprobs) == 2 and t.logprob == t.top_logprobs[0].logprob for t in choice.logprobs.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_unsupported_fields_are_refused_by_name(client):
    for extra, param in [({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="a", max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == param and param in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.body["param"] == "tools" and "does not support" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs" and "logprobs: true" in e.value.body["message"]


BAD = [  # (how it is sent, the field named); every one arrives while a stream is in flight
    ({"prompt": "a", "temperature": 1e-45}, "temperature"),
    ({"prompt": "a", "repetition_penalty": 1e-45}, "repetition_penalty"),
    ({"prompt": "a", "top_k": 2 ** 63}, "top_k"),
    ({"prompt": "a", "seed": 2 ** 64}, "seed"),
    ('{"prompt": "\\ud800"}', "prompt"),  # a lone surrogate: not Unicode text
    (b'{"prompt": "\xff\xfe"}', "body"),  # not UTF-8
    ("[" * 100_000 + "]" * 100_000, "body"),  # nested past the parser's recursion limit
    ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": [[1, 2], [99999]]}, "prompt"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
]


def test_bad_requests_fail_alone_while_a_stream_is_in_flight(server):
    body = {"prompt": "JULIET:", "max_tokens": 200, "temperature": 1.0, "seed": 21}
    alone = requests.post(f"{server}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    with requests.post(f"{server}/v1/completions", json={**body, "stream": True}, stream=True, timeout=120) as r:
        lines = r.iter_lines(decode_unicode=True)
        pieces = [json.loads(next(line for line in lines if line)[6:])["choices"][0]["text"]]
        for sent, param in BAD:
            kw = {"json": sent} if isinstance(sent, dict) else {"data": sent}
            bad = requests.post(f"{server}/v1/completions", headers={"Content-Type": "application/json"}, timeout=60,
                                **kw)
            err = bad.json()["error"]
            assert bad.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error", bad.text
        for path, status in [("/v1/nope", 404), ("/v1/completions", 405)]:
            bad = requests.get(f"{server}{path}", timeout=60) if status == 405 else requests.post(f"{server}{path}")
            assert bad.status_code == status and set(bad.json()["error"]) == {"message", "type", "param", "code"}
        for line in lines:
            if line and line != "data: [DONE]":
                pieces += [c["text"] for c in json.loads(line[6:])["choices"]]
    assert "".join(pieces) == alone


def test_lm_eval_scores_the_server_as_it_scores_the_exported_model(server, ckpt, tmp_path):
    """The same multiple-choice task, `local-completions` against the server and `hf` on the exported
    directory: per-choice loglikelihoods within 1e-4 (fp32) and equal accuracies."""
    pytest.importorskip("lm_eval")
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dsmoe.export import export_checkpoint

    hf_dir = tmp_path / "hf"
    export_checkpoint(ckpt, ".", hf_dir)
    docs = [("ROMEO: O, she doth teach the", [" torches", " lemons", " ships"], 0),
            ("JULIET: Good night, good", [" morrow", " night", " dog"], 1),
            ("KING: Now is the winter of our", [" discontent", " spoons"], 0),
            ("First Citizen:\nBefore we proceed any further, hear me", [" speak", " sing", " fly"], 0),
            ("MERCUTIO: A plague o' both your", [" houses", " carrots"], 0)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "label": y}) + "\n" for c, ch, y in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        f"task: dsmoe_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))

    def run(model, model_args):
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["dsmoe_tiny_mc"], task_manager=tasks,
                                      log_samples=True, batch_size=2, device="cpu")
        samples = sorted(out["samples"]["dsmoe_tiny_mc"], key=lambda s: s["doc_id"])
        return out["results"]["dsmoe_tiny_mc"]["acc,none"], [[r[0] for r in s["filtered_resps"]] for s in samples]

    acc_api, ll_api = run("local-completions", f"base_url={server}/v1/completions,model=tiny,tokenizer={hf_dir},"
                                               "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1")
    acc_hf, ll_hf = run("hf", f"pretrained={hf_dir},dtype=float32")
    assert len(ll_api) == len(docs) and [len(x) for x in ll_api] == [len(d[1]) for d in docs]
    diff = max(abs(float(a) - float(b)) for xa, xb in zip(ll_api, ll_hf) for a, b in zip(xa, xb))
    print(f"lm-eval: {sum(map(len, ll_api))} loglikelihoods, max |server - hf| {diff:.2e}; acc {acc_api} vs {acc_hf}")
    assert diff < 1e-4, (ll_api, ll_hf)
    assert acc_api == acc_hf
