"""Conventions that hold across the API, the CLI and the lm-eval adapter (issue 12).

1. One BOS default for scoring: `<|endoftext|>` prepended, the same in
   `model.perplexity`, `model.score`, `model.choose` and `gpt2lab score`, and equal to
   what TransformerLens (prepend_bos) and lm-eval (rolling loglikelihood) compute.
2. The bundled model's name, "bundled", works wherever a model is named; a local folder
   of that name wins, as any path does.
3. A training run's out_dir or `.pt` step checkpoint is refused, naming best/ and final/.
4. Hub failures say why: the missing `[hub]` extra, HF_HUB_OFFLINE, or the download's
   real error, the network simulated with huggingface_hub's own HTTP client and a
   mock transport (nothing leaves this machine).
"""

from __future__ import annotations

import inspect
import math
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import hf_model

import gpt2lab as gl
from gpt2lab import checkpoint, scoring
from gpt2lab.checkpoint import BUNDLED, bundled_dir
from gpt2lab.cli import main
from gpt2lab.cli import score as cli_score

EOT = 50256
N_CTX = 64
TEXT = "The unbelievably quixotic cat sat on the mat.\n\nIt purred, then slept."
DATA = Path(gl.__file__).parent / "data"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_model(seed=5, n_positions=N_CTX)
    path = tmp_path_factory.mktemp("conventions_ckpt")
    hf.save_pretrained(path)
    return gl.load(path), hf, path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty HF cache; downloads switched off (tests of downloads switch them on)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "hf_home" / "hub"


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


def load_error(name) -> str:
    with pytest.raises(gl.GPT2LabError) as err:
        gl.load(name)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ---- 1. one BOS default for scoring --------------------------------------------------------
def test_every_scoring_entry_point_has_the_same_bos_default():
    defaults = {
        "perplexity": inspect.signature(scoring.perplexity).parameters["bos"].default,
        "score": inspect.signature(scoring.score).parameters["bos"].default,
        "choose": inspect.signature(scoring.choose).parameters["bos"].default,
        "gpt2lab score": inspect.signature(cli_score).parameters["bos"].default.default,
    }
    assert set(defaults.values()) == {True}, defaults


@torch.no_grad()
def test_default_perplexity_scores_every_token_like_transformers_on_eot_plus_text(pair):
    ours, hf, _ = pair
    ids = ours.tokenizer.encode(TEXT)
    logits = hf(torch.tensor([[EOT, *ids]])).logits[0, :-1].double()
    nll = -logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).sum().item()
    ppl, nll_sum, n = ours.perplexity(TEXT, return_details=True)
    assert n == len(ids)  # every token of the text, the first included
    assert math.isclose(nll_sum, nll, rel_tol=1e-5)
    assert math.isclose(ppl, math.exp(nll / len(ids)), rel_tol=1e-5)
    # score() agrees token by token, and its sum is perplexity's
    assert math.isclose(-ours.score(TEXT).total_logprob, nll_sum, rel_tol=1e-5)
    # bos=False: the first token is context only (HF's guide), one token fewer
    assert ours.perplexity(TEXT, bos=False, return_details=True)[2] == len(ids) - 1


def test_default_perplexity_equals_transformer_lens_loss_with_its_default_bos(pair, hf_tokenizer):
    from tl_reference import hooked_transformer

    ours, _, _ = pair
    ref = hooked_transformer(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.set_tokenizer(hf_tokenizer)  # TransformerLens re-loads its tokenizer by name
    ref.cfg.default_prepend_bos = True  # what HookedTransformer.from_pretrained("gpt2") sets
    with torch.no_grad():
        loss = ref(TEXT, return_type="loss").item()  # mean NLL, BOS prepended by TL itself
    assert ref.to_tokens(TEXT)[0, 0].item() == EOT
    assert math.isclose(ours.perplexity(TEXT), math.exp(loss), rel_tol=1e-5)


def test_default_perplexity_equals_lm_eval_rolling_loglikelihood(pair):
    from lm_eval.api.instance import Instance

    from gpt2lab.lm_eval_model import GPT2LabLM

    ours, _, _ = pair
    lm = GPT2LabLM(pretrained=ours)
    request = Instance("loglikelihood_rolling", {}, (TEXT,), 0)
    (rolling,) = lm.loglikelihood_rolling([request])
    _, nll_sum, _ = ours.perplexity(TEXT, return_details=True)
    assert math.isclose(-rolling, nll_sum, rel_tol=1e-5)


def test_cli_score_prints_the_api_numbers_both_ways(pair, offline, capsys):
    ours, _, path = pair
    for flag, bos in (([], True), (["--no-bos"], False)):
        rc, out, err = run_main(["score", TEXT, "--model", str(path), *flag], capsys)
        assert rc == 0, err
        ppl, nll, n = ours.perplexity(TEXT, bos=bos, return_details=True)
        assert out.splitlines()[0] == (
            f"perplexity {ppl:.4f}  ({n} tokens scored, mean NLL {nll / n:.4f} nats)"
        )


# ---- 2. the bundled model's name -----------------------------------------------------------
def test_bundled_is_a_name_for_the_bundled_model(offline):
    assert checkpoint.resolve(BUNDLED) == checkpoint.resolve(None) == bundled_dir()
    named, default = gl.load("bundled"), gl.load()
    assert named.cfg == default.cfg
    for (name, a), (_, b) in zip(
        named.state_dict().items(), default.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_cli_takes_bundled_as_a_model_name(offline, capsys):
    rc, out, err = run_main(["info", "bundled"], capsys)
    assert rc == 0, err
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert rows["directory"] == str(bundled_dir())
    args = ["generate", "ROMEO:", "-n", "3"]
    rc, named, err = run_main([*args, "--model", "bundled"], capsys)
    assert rc == 0, err
    assert (named, "") == run_main(args, capsys)[1:]  # the same text as without a model


def test_a_local_folder_named_bundled_wins_like_any_path(pair, offline, tmp_path, monkeypatch):
    _, _, path = pair
    monkeypatch.chdir(tmp_path)
    shutil.copytree(path, tmp_path / "bundled")
    assert gl.load("bundled").cfg.n_ctx == N_CTX  # the local checkpoint, not the bundled model
    shutil.rmtree(tmp_path / "bundled")
    (tmp_path / "bundled").mkdir()  # a folder that is no checkpoint: say what it hides
    msg = load_error("bundled")
    assert "config.json" in msg and "hides the bundled model" in msg
    assert gl.load().cfg.n_ctx != N_CTX  # no name: the bundled model, whatever is here


def test_a_local_folder_named_like_a_preset_says_how_to_get_the_preset(
    offline, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2-medium").mkdir()
    msg = load_error("gpt2-medium")
    assert "hides the preset" in msg and "openai-community/gpt2-medium" in msg


def test_unknown_name_lists_bundled(offline):
    msg = load_error("gpt-two")
    assert "does not exist" in msg and "bundled" in msg and "gpt2-medium" in msg


# ---- 3. what a training run leaves ---------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real `gpt2lab train` out_dir: step checkpoints, log, report, best/ and final/."""
    from gpt2lab.training.config import load_config
    from gpt2lab.training.data import prepare
    from gpt2lab.training.trainer import train

    src = tmp_path_factory.mktemp("run_src")
    for i in range(8):
        (src / f"doc{i}.txt").write_text(f"Document {i}: the cat sat on the mat. " * 20)
    data = tmp_path_factory.mktemp("run_data")
    manifest = prepare([src], data, val_fraction=0.5, seed=0, progress=False)
    assert manifest["documents"]["val"] > 0  # so the run evaluates, and writes best/
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = load_config(None, [
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_ctx=32",
        f"data.dir='{data}'", f"train.out_dir='{out}'", "train.seq_len=16",
        "train.batch_size=2", "train.max_steps=4", "train.warmup_steps=1",
        "eval.every=2", "eval.iters=1", "checkpoint.every=2", "log.progress=false",
    ])  # fmt: skip
    train(cfg)
    return out


def test_the_run_has_the_layout_checkpoint_py_recognises(run):
    from gpt2lab.training import rundir

    # checkpoint.py may not import training/ (it sits below it): the names must agree
    assert rundir.CKPT_DIR == "checkpoints"
    assert set(checkpoint.RUN_MODELS) <= set(rundir.RUN_DIRS)
    assert {p.name for p in run.iterdir()} >= {"checkpoints", "best", "final", "log.jsonl"}
    assert rundir.checkpoints(run)


def test_run_folder_names_best_and_final(run):
    msg = load_error(run)
    assert f"{run} is a training run's folder, not a model" in msg
    assert f"{run / 'best'} (the lowest validation loss)" in msg
    assert f"{run / 'final'} (the last step)" in msg
    assert load_error(run / "checkpoints") == msg.replace(
        f"{run} is a training run's folder",
        f"{run / 'checkpoints'} holds a training run's step checkpoints",
    )
    # and both load, as HF checkpoints
    assert gl.load(run / "best").cfg.n_layers == gl.load(run / "final").cfg.n_layers == 1


def test_step_checkpoint_names_best_and_final(run, capsys):
    from gpt2lab.training import rundir

    step = rundir.checkpoints(run)[-1]
    msg = load_error(step)
    assert msg.startswith(f"{step} is a training checkpoint")
    assert "--resume" in msg and str(run / "best") in msg and str(run / "final") in msg
    rc, out, err = run_main(["generate", "hi", "--model", str(step)], capsys)
    assert rc == 1 and out == ""
    assert err == f"gpt2lab: error: {msg}\n"


def test_run_without_a_model_yet_says_when_one_appears(run, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run / "checkpoints", partial / "checkpoints")
    msg = load_error(partial / "checkpoints" / "step_0000002.pt")
    assert "has saved no model yet" in msg
    assert str(partial / "final") in msg and str(partial / "best") in msg


def test_other_pt_file_is_explained(tmp_path):
    torch.save({"model": {}}, tmp_path / "ckpt.pt")  # e.g. nanoGPT's out/ckpt.pt
    msg = load_error(tmp_path / "ckpt.pt")
    assert "does not load as a model" in msg and "config.json" in msg
    assert "<out_dir>/best" in msg and "<out_dir>/final" in msg


def test_a_file_of_a_checkpoint_still_means_its_folder(pair, tmp_path):
    ours, _, path = pair
    assert gl.load(path / "model.safetensors").cfg == ours.cfg
    (tmp_path / "notes.txt").write_text("hello")
    msg = load_error(tmp_path / "notes.txt")
    assert "is a file, not a checkpoint" in msg and "config.json" in msg


# ---- 4. the hub: missing extra, offline mode, real download errors ---------------------------
def cannot_download(name: str, cache: Path, why: str) -> str:
    repo = checkpoint.HUB_REPOS.get(name, [name])[0]
    return (
        f"cannot load {name}: it is not in the Hugging Face cache ({cache}) and {why}; or "
        f"download config.json and model.safetensors from https://huggingface.co/{repo} "
        "into a folder and pass its path"
    )


def test_without_huggingface_hub_the_message_names_the_extra(offline, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as uninstalled
    why = "huggingface_hub, which downloads models, is not installed (pip install 'gpt2lab[hub]')"
    assert load_error("gpt2-medium") == cannot_download("gpt2-medium", offline, why)
    rc, out, err = run_main(["generate", "hi", "--model", "gpt2-medium"], capsys)
    assert rc == 1 and "pip install 'gpt2lab[hub]'" in err and err.count("\n") == 1
    # offline as well: both reasons
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set as well" in load_error("gpt2-medium")


@pytest.mark.parametrize(
    "env, value",
    [("HF_HUB_OFFLINE", "1"), ("HF_HUB_OFFLINE", "true"), ("TRANSFORMERS_OFFLINE", "YES")],
)
def test_offline_mode_is_named(offline, monkeypatch, env, value):
    pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv(env, value)
    why = f"{env} is set, which forbids downloads (unset it to download)"
    assert load_error("gpt2-medium") == cannot_download("gpt2-medium", offline, why)


@pytest.fixture
def hub(offline, monkeypatch, tmp_path):
    """huggingface_hub online, its HTTP client answering from `hub.handler` (set by the
    test) through a mock transport, so snapshot_download runs its real code on canned
    responses and raises its real exceptions."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    if not hasattr(huggingface_hub, "set_client_factory"):
        pytest.skip("huggingface_hub < 1.0 has no pluggable HTTP client")
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    http = getattr(_http, "httpx2", None) or _http.httpx  # the HTTP library it is built on
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # it is read once, at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(offline))
    monkeypatch.setattr(constants, "HF_HOME", str(offline.parent))
    monkeypatch.setattr(
        constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"), raising=False
    )

    class Hub:
        handler = None
        requests: list[str] = []

    def transport(request):
        Hub.requests.append(str(request.url))
        return Hub.handler(http, request)

    huggingface_hub.set_client_factory(lambda: http.Client(transport=http.MockTransport(transport)))
    yield Hub
    huggingface_hub.set_client_factory(_http.default_client_factory)


def model_requests(hub) -> list[str]:
    return [u for u in hub.requests if "/api/models/" in u]


def test_misspelt_repo_id_shows_repository_not_found(hub, offline):
    hub.handler = lambda http, request: http.Response(
        404, headers={"X-Error-Code": "RepoNotFound"}, request=request
    )
    why = (
        "downloading it failed: repository openai-community/gpt2-mediun not found on the "
        "Hugging Face Hub (check the name; a private repository needs a login: hf auth "
        "login, or set HF_TOKEN)"
    )
    msg = load_error("openai-community/gpt2-mediun")
    assert msg == cannot_download("openai-community/gpt2-mediun", offline, why)
    assert model_requests(hub)  # a download was really tried


def test_gated_repo_says_so(hub):
    hub.handler = lambda http, request: http.Response(
        403, headers={"X-Error-Code": "GatedRepo"}, request=request
    )
    assert "someone/gated is a gated repository: accept its terms" in load_error("someone/gated")


def test_network_unreachable_shows_the_connection_error(hub, offline):
    def refuse(http, request):
        raise http.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)

    hub.handler = refuse
    why = (
        "downloading it failed: cannot reach the Hugging Face Hub (ConnectError: [Errno -3] "
        "Temporary failure in name resolution)"
    )
    assert load_error("gpt2-medium") == cannot_download("gpt2-medium", offline, why)
    assert model_requests(hub)[0].endswith("/api/models/openai-community/gpt2-medium/revision/main")


def test_hub_server_error_is_shown_in_one_line_with_the_hubs_words(hub):
    hub.handler = lambda http, request: http.Response(
        503, json={"error": "Down for maintenance"}, request=request
    )
    msg = load_error("someone/model")
    assert "downloading it failed: HfHubHTTPError: " in msg
    assert "503" in msg and "(Down for maintenance)" in msg


def test_a_download_without_safetensors_weights_says_so(offline, monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    empty = tmp_path / "snapshot"
    empty.mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(empty))
    msg = load_error("someone/pickles-only")
    assert "the downloaded copy has no config.json with safetensors weights" in msg


def test_the_cache_still_comes_first(pair, offline, monkeypatch):
    """A cached preset loads without trying the network (nor needing huggingface_hub)."""
    _, _, path = pair
    snapshot = offline / "models--openai-community--gpt2" / "snapshots" / "abc"
    shutil.copytree(path, snapshot)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert gl.load("gpt2").cfg.n_ctx == N_CTX
