"""lm-evaluation-harness' own OpenAI-completions client (`local-completions`) against the
server: a loglikelihood task (echo + prompt logprobs) and a generate_until task give the
same per-sample numbers and texts as lm-eval's `gpt2lab` model run directly in-process.

lm-eval reaches the tokenizer through the server (its "remote" backend: /tokenizer_info,
/tokenize, /detokenize, as vLLM serves them), so nothing is fetched from a hub."""

from __future__ import annotations

from pathlib import Path

import lm_eval
import lm_eval.models  # noqa: F401  (the registry is filled lazily only when empty)
import pytest
from lm_eval.tasks import TaskManager
from test_serve_api import start_server

import gpt2lab
import gpt2lab.lm_eval_model  # noqa: F401  (registers lm-eval's "gpt2lab" model)
from gpt2lab.serve import ServeSettings, create_app

DATA = Path(__file__).parent / "data" / "lm_eval"
TASKS = ["gpt2lab_tiny_mc", "gpt2lab_tiny_gen"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.chdir(DATA)  # the tasks' data_files paths are relative


@pytest.fixture(scope="module")
def server():
    model = gpt2lab.load("bundled")
    base, stop = start_server(create_app(model, ServeSettings(model_name="bundled")))
    yield base
    stop()


def _samples(results) -> dict[tuple[str, int], list]:
    return {
        (task, s["doc_id"]): s["filtered_resps"]
        for task, samples in results["samples"].items()
        for s in samples
    }


def _run(model: str, model_args: str):
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(DATA)),
        bootstrap_iters=0,
        log_samples=True,
    )


def test_local_completions_equals_gpt2lab_eval(server):
    direct = _run("gpt2lab", "pretrained=bundled,batch_size=4")
    served = _run(
        "local-completions",
        f"model=bundled,base_url={server}/v1/completions,tokenizer_backend=remote,"
        "num_concurrent=2,max_retries=1",
    )
    want, got = _samples(direct), _samples(served)
    assert got.keys() == want.keys() and len(got) == 16
    for key, responses in want.items():
        if key[0] == "gpt2lab_tiny_gen":
            assert got[key] == responses  # the same greedy text, cut at the same stop
        else:  # (log-likelihood, is_greedy) per choice
            for (ll, greedy), (ll_served, greedy_served) in zip(responses, got[key], strict=True):
                assert ll_served == pytest.approx(ll, abs=1e-4)
                assert greedy_served == greedy
    for task in TASKS:
        a, b = direct["results"][task], served["results"][task]
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            assert b.get(metric) == a.get(metric)
    # the generate_until texts are real continuations, not all empty
    texts = [r for (task, _), rs in want.items() if task == "gpt2lab_tiny_gen" for r in rs]
    assert sum(bool(t.strip()) for t in texts) >= 4


def test_default_tokenizer_backend_finds_the_servers_tokenizer(server):
    """With tokenizer_backend left at "auto", lm-eval detects the server's tokenizer."""
    from lm_eval.utils import check_remote_tokenizer_support

    assert check_remote_tokenizer_support(server + "/v1/completions")
