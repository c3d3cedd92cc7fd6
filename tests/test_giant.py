"""Giant models: activations through nnsight (locally, and up to the NDIF request) and
through transformers with accelerate's offload, truncated after the hook's layer."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sae_lens_itda import ITDATrainingRunner
from sae_lens_itda.sources.hf_layers import hidden_states, hook_layer, module_path

from sae_lens_itda.sources import nnsight_source as ns

# nnsight comes with the `giant` extra (scripts/setup.sh installs it); the rest needs only transformers.
needs_nnsight = pytest.mark.skipif(importlib.util.find_spec("nnsight") is None, reason="nnsight is not installed")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# --- hook names ------------------------------------------------------------------------


def _meta_model(kind: str):
    import transformers as tf

    configs = {
        "llama": tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, vocab_size=64),
        "gemma3": tf.Gemma3TextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8, vocab_size=64),
        "gpt2": tf.GPT2Config(n_embd=16, n_layer=4, n_head=2, vocab_size=64),
        "gpt_neox": tf.GPTNeoXConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, vocab_size=64),
    }
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(configs[kind])


@pytest.mark.parametrize("kind, layers", [("llama", "model.layers"), ("gemma3", "model.layers"),
                                          ("gpt2", "transformer.h"), ("gpt_neox", "gpt_neox.layers")])
def test_residual_names_map_to_decoder_layer_outputs(kind, layers):
    model = _meta_model(kind)
    assert module_path(model, "blocks.3.hook_resid_post") == f"{layers}.3"
    assert module_path(model, "blocks.3.hook_resid_pre") == f"{layers}.2"
    assert module_path(model, f"{layers}.1.mlp") == f"{layers}.1.mlp"
    with pytest.raises(ValueError, match="embeddings' output"):
        module_path(model, "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="did you mean"):
        module_path(model, f"{layers}.3x")
    with pytest.raises(ValueError, match="no module"):
        module_path(model, "blocks.9.hook_resid_post")


def test_hook_layer_of_names_and_paths():
    assert hook_layer("blocks.16.hook_resid_post") == 16
    assert hook_layer("blocks.16.hook_resid_pre") == 15
    assert hook_layer("model.layers.16") == 16
    assert hook_layer("model.layers.16.mlp.down_proj") == 16
    with pytest.raises(ValueError, match="Cannot tell the layer"):
        hook_layer("lm_head")


def test_hidden_states_never_take_the_first_sequence_of_a_tensor():
    h = torch.randn(2, 5, 8)
    assert hidden_states(h, 2, 5, "x") is h  # transformers >= 4.54: the layer's output is the tensor
    assert hidden_states((h, None), 2, 5, "x") is h  # older: (hidden, ...)
    with pytest.raises(ValueError, match=r"gave \(5, 8\)"):
        hidden_states(h[0], 2, 5, "x")  # what `.output[0]` on a tensor would give


# --- nnsight, local --------------------------------------------------------------------


@pytest.fixture(scope="module")
def nn_smollm2():
    pytest.importorskip("nnsight")
    return ns.load_nnsight_model("smollm2-135m")


def _runner_cfg(model_class_name, tokens=4096, batch=8, **extra):
    from sae_lens_itda.cli import DEMO_CONFIG, load_runner_config

    cfg = load_runner_config(DEMO_CONFIG, training_tokens=tokens, **extra)
    cfg.output_path = cfg.checkpoint_path = None
    cfg.hook_name, cfg.sae.k, cfg.store_batch_size_prompts = "blocks.5.hook_resid_post", 8, batch
    cfg.model_class_name, cfg.model_from_pretrained_kwargs = model_class_name, {}
    return cfg


@pytest.mark.real_model
@pytest.mark.slow
def test_nnsight_build_equals_transformerlens_build(smollm2, nn_smollm2):
    """Same token stream, same dictionary: size, labels and atoms (to 1e-4)."""
    tl = ITDATrainingRunner(_runner_cfg("HookedTransformer"), override_model=smollm2, progress=False).run()
    runner = ITDATrainingRunner(_runner_cfg("LanguageModel"), override_model=nn_smollm2, progress=False)
    nn = runner.run()
    assert nn.cfg.d_sae == tl.cfg.d_sae > 500
    assert nn.labels == tl.labels
    torch.testing.assert_close(nn.W_dec, tl.W_dec, atol=1e-4, rtol=0)
    assert nn.cfg.metadata.model_class_name == "LanguageModel"


@pytest.mark.real_model
def test_resume_does_not_request_batches_already_added(nn_smollm2, tmp_path):
    kw = dict(tokens=640, batch=1)
    runner = ITDATrainingRunner(_runner_cfg("LanguageModel", **kw), override_model=nn_smollm2, progress=False)
    full = runner.run()
    same = dict(override_model=nn_smollm2, override_dataset=runner.dataset, progress=False)  # tokenized once
    cfg = _runner_cfg("LanguageModel", **kw)
    cfg.checkpoint_path, cfg.sae.checkpoint_every_tokens = str(tmp_path / "ckpt"), 256
    ITDATrainingRunner(cfg, **same).run()
    ckpt = tmp_path / "ckpt" / "256"
    assert ckpt.is_dir()
    before = nn_smollm2.requests
    resumed = ITDATrainingRunner(_runner_cfg("LanguageModel", **kw), resume_from=ckpt, **same).run()
    assert nn_smollm2.requests - before == 5 - 2  # 5 batches of 128 tokens, 2 in the checkpoint
    assert torch.equal(resumed.W_dec, full.W_dec) and resumed.labels == full.labels


# --- nnsight, remote up to the request -----------------------------------------------


@pytest.fixture
def keep_sys_path():
    # nnsight's remote simulation hides local paths and puts them back at the end of sys.path.
    before = list(sys.path)
    yield
    sys.path[:] = before


@pytest.mark.real_model
def test_remote_trace_serializes_and_gives_the_local_activations(nn_smollm2, keep_sys_path):
    """``remote="local"``: the trace is serialized as for NDIF and run from the serialized
    form with this package hidden, as on the server."""
    tokens = torch.randint(0, 1000, (2, 8))
    hook = "blocks.3.hook_resid_post"
    local = nn_smollm2.run_with_cache(tokens, names_filter=[hook])[1][hook]
    sim = ns.NNsightLM(nn_smollm2.lm, "smollm2-135m", {"remote": "local"}, progress=False)
    torch.testing.assert_close(sim.run_with_cache(tokens, names_filter=[hook])[1][hook], local, atol=0, rtol=0)


@pytest.mark.real_model
def test_remote_request_retries_connection_errors_with_backoff(nn_smollm2, keep_sys_path, monkeypatch):
    """nnsight's own RemoteBackend up to the network: the request is built and serialized with
    the key, the connection fails twice, the third attempt's job runs (here, locally)."""
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.intervention.backends.remote import RemoteBackend
    from nnsight.modeling import huggingface

    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    ns.ndif_api_key()
    monkeypatch.setitem(huggingface._ID_CACHE, nn_smollm2.lm.repo_id, "HuggingFaceTB/SmolLM2-135M-Instruct")
    sent = []

    def request(self, request, tracer):
        blob = self._serialize(tracer)
        sent.append((self.api_key, self.model_key, len(blob)))
        if len(sent) <= 2:
            raise ConnectionRefusedError("connection refused")
        LocalSimulationBackend(nn_smollm2.lm)(tracer)  # the server's part

    monkeypatch.setattr(RemoteBackend, "request", request)
    sleeps = []
    remote = ns.NNsightLM(nn_smollm2.lm, "smollm2-135m", {"remote": True}, retry_backoff_s=2.0, sleep=sleeps.append)
    tokens = torch.randint(0, 1000, (2, 8))
    hook = "blocks.3.hook_resid_post"
    acts = remote.run_with_cache(tokens, names_filter=[hook])[1][hook]
    torch.testing.assert_close(acts, nn_smollm2.run_with_cache(tokens, names_filter=[hook])[1][hook], atol=0, rtol=0)
    assert sleeps == [2.0, 4.0] and remote.requests == 3
    assert all(key == "test-key" and "SmolLM2-135M-Instruct" in model and size > 0 for key, model, size in sent)


@needs_nnsight
def test_retries_only_connection_errors_and_give_up_with_a_resume_hint():
    import httpx
    import websocket
    from nnsight.intervention.backends.remote import RemoteError

    def http_error(status):
        request = httpx.Request("POST", "http://ndif.test/request")
        return httpx.HTTPStatusError("x", request=request, response=httpx.Response(status, request=request))

    def wrapped(cause):
        try:
            raise RemoteError("Failed to send request") from cause
        except RemoteError as e:
            return e

    for retried in (ConnectionResetError(), TimeoutError(), http_error(503), http_error(429), wrapped(http_error(502)),
                    httpx.ConnectError("down"), websocket.WebSocketConnectionClosedException("closed")):
        assert ns.is_connection_error(retried), retried
    for final in (http_error(401), wrapped(http_error(401)), RemoteError("job failed: CUDA out of memory"),
                  ValueError("bad hook"), websocket.WebSocketBadStatusException("forbidden", 403)):
        assert not ns.is_connection_error(final), final

    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        raise ConnectionResetError("reset")

    with pytest.raises(ConnectionError, match="failed 4 times.*resume_from"):
        ns.with_retries(flaky, retries=3, backoff_s=1.0, what="NDIF request 7", sleep=sleeps.append, max_backoff_s=3)
    assert len(calls) == 4 and sleeps == [1.0, 2.0, 3]

    def broken():
        calls.append(1)
        raise RemoteError("job failed")

    calls.clear()
    with pytest.raises(RemoteError):
        ns.with_retries(broken, retries=3, backoff_s=1.0, what="x", sleep=sleeps.append)
    assert len(calls) == 1


@needs_nnsight
def test_remote_without_a_key_fails_before_loading(monkeypatch):
    import nnsight

    from sae_lens_itda.cli import load_runner_config

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(ns.MissingAPIKeyError, match="NDIF_API_KEY"):
        ns.load_nnsight_model("meta-llama/Llama-3.1-405B", remote=True)
    cfg = load_runner_config(CONFIGS / "llama-3.1-405b-ndif.yaml")
    assert cfg.model_class_name == "LanguageModel" and cfg.model_from_pretrained_kwargs["remote"] is True
    with pytest.raises(ns.MissingAPIKeyError):
        ITDATrainingRunner(cfg)
    with pytest.raises(ValueError, match="runs locally"):
        ns.load_nnsight_model("smollm2-135m", remote=True)


# --- transformers + accelerate offload, truncated after the hook --------------------


@pytest.mark.real_model
def test_offloaded_model_stops_after_the_hook_layer(tmp_path):
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    from sae_lens_itda.sources.models import load_hf_model
    from sae_lens_itda.sources.offload import load_offloaded

    hook = "blocks.5.hook_resid_post"
    # 90 MiB of CPU: embeddings and layers 0-3 in memory, layers 4-5 read from disk.
    model = load_offloaded("smollm2-135m", hook, offload_folder=str(tmp_path), max_memory={"cpu": "90MiB"})
    placed = model.model.hf_device_map
    assert placed["model.embed_tokens"] == "cpu" and placed["model.layers.5"] == "disk"
    assert len(model.model.model.layers) == 6  # layers 6-29 are not even loaded
    calls = {}
    for name, mod in model.model.named_modules():
        mod.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    tokens = torch.randint(0, 1000, (2, 8))
    _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(hook))
    assert cache[hook].dtype == torch.bfloat16
    assert [calls.get(f"model.layers.{i}") for i in range(6)] == [1] * 6
    assert "model.norm" not in calls and "lm_head" not in calls
    full, _ = load_hf_model("smollm2-135m", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = full(tokens, output_hidden_states=True).hidden_states[6]
    torch.testing.assert_close(cache[hook], expected, atol=1e-2, rtol=1.6e-2)  # bfloat16


@pytest.mark.real_model
def test_runner_builds_through_the_offload_path(tmp_path):
    cfg = _runner_cfg("AutoModelForCausalLM", tokens=256, batch=2, context_size=128)
    cfg.model_from_pretrained_kwargs = {"offload_folder": str(tmp_path), "device_map": "cpu"}
    runner = ITDATrainingRunner(cfg, progress=False)
    itda = runner.run()
    assert itda.cfg.d_sae > 10 and itda.cfg.metadata.model_class_name == "AutoModelForCausalLM"
    assert len(runner.model.model.model.layers) == 6
