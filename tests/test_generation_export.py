"""Generation programs (issue 12): `mr.export_for_generation`, `rewrite --generate` and the
`generate` runner. The oracle is transformers' own `generate()` (greedy) of the same model
rewritten in memory (or loaded with `mr.load` from a `--format hf` rewrite): the exported
prefill and decode programs, driven by the runner, must produce the same tokens, token for
token, for a left-padded batch of two prompts that cross several MoBA blocks, with decode steps
that cross block boundaries.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import moba_rewrite as mr
from moba_rewrite import cli
from moba_rewrite.cli.generate_cmd import greedy
from moba_rewrite.exporters.generation import GenerationExportError, save_generation_pt2

BLOCK, TOP_K = 16, 2
POLICY = {"version": 1, "defaults": {"block_size": BLOCK, "top_k": TOP_K}}
MAX_LEN, NEW = 96, 30
LENGTHS = (50, 37)  # 4 and 3 blocks of prompt; decode runs to position 79, crossing 64
PAD = 0


def _config(family: str):
    common = dict(vocab_size=64, max_position_embeddings=128, eos_token_id=None, bos_token_id=None)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, **common)
    if family == "llama":
        return transformers.LlamaConfig(**llama_like)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=8, **llama_like)
    if family == "qwen2_sliding":  # layer 1 has a sliding window shorter than the prompts
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=24, max_window_layers=1, **llama_like)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=128, vocab_size=64,
                                       eos_token_id=None, bos_token_id=None)
    raise ValueError(family)


def _model(family: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_config(family)).eval()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 64, (n,), generator=g).tolist() for n in LENGTHS]


def _reference(model, prompts: list[list[int]], new: int = NEW) -> tuple[list[list[int]], torch.Tensor]:
    """`generate()` (greedy) on the left-padded batch: new tokens per prompt and the first step's logits."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=PAD,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, width:].tolist(), out.logits[0]


def _run(programs, prompts, new: int = NEW):
    first = []

    def recording(program):
        def run(*args):
            out = program(*args)
            first.append(out[0][:, -1])
            return out
        return run

    prefill, decode = recording(programs.prefill.module()), recording(programs.decode.module())
    return greedy(prefill, decode, programs.spec, prompts, new), first[0]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "qwen2_sliding"])
def test_programs_generate_what_generate_does_token_for_token(family):
    model = _model(family)
    programs = mr.export_for_generation(model, POLICY, max_seq_len=MAX_LEN, batch=2)
    for program in (programs.prefill, programs.decode):  # MoBA against the cache, in both programs
        assert any("attention_kv_cache" in str(n.target) for n in program.graph.nodes)
    prompts = _prompts()
    want, want_logits = _reference(model, prompts)  # the same model object, rewritten in memory
    got, got_logits = _run(programs, prompts)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-4)
    dense_logits = _reference(_model(family), prompts, new=1)[1]
    assert not torch.allclose(got_logits, dense_logits, atol=1e-3)  # MoBA routes: not the dense model


def test_a_single_short_prompt_and_a_batch_smaller_than_exported():
    model = _model("llama")
    programs = mr.export_for_generation(model, POLICY, max_seq_len=40, batch=2)
    for prompts in ([[7]], [[7, 8, 9]], [list(range(3, 40))]):  # one token: decode program only; the cache's last slot
        new = 40 - len(prompts[0]) + 1
        assert _run(programs, prompts, new)[0] == _reference(model, prompts, new)[0]


def test_runner_stops_a_prompt_at_its_end_of_sequence_token():
    model = _model("llama")
    programs = mr.export_for_generation(model, POLICY, max_seq_len=MAX_LEN, batch=2)
    prompts = _prompts()
    free, _ = _run(programs, prompts, 6)
    programs.spec.eos_token_id = [free[0][2]]
    stopped, _ = _run(programs, prompts, 6)
    assert stopped[0] == free[0][:3]
    eos = free[0][2]
    assert stopped[1] == (free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1])


def test_models_that_cannot_become_generation_programs_are_named():
    with pytest.raises(GenerationExportError, match="Hugging Face model that generates"):
        mr.export_for_generation(torch.nn.Linear(4, 4), None, max_seq_len=32)
    with pytest.raises(GenerationExportError, match="max_position_embeddings 128"):
        mr.export_for_generation(_model("llama"), POLICY, max_seq_len=129)


# --------------------------------------------------------------------------- the command line


def _cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _char_tokenizer():
    """A character-level tokenizer whose ids fit the models' 64-token vocabulary (built here: no hub)."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "<s>", "<pad>"] + list(string.ascii_lowercase + string.digits + " .,?!'")
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A Llama checkpoint with a tokenizer, its `--format hf` rewrite, and its `--generate` pt2 (batch 2)."""
    root = tmp_path_factory.mktemp("generation")
    _model("llama").save_pretrained(root / "llama")
    _char_tokenizer().save_pretrained(root / "llama")
    (root / "policy.json").write_text(json.dumps(POLICY))
    for extra in (["--format", "hf", "--out", root / "hf"],
                  ["--format", "pt2", "--generate", "--max-seq-len", MAX_LEN, "--batch", 2, "--out", root / "gen.pt2"]):
        code = cli.main([str(a) for a in ["rewrite", root / "llama", "--policy", root / "policy.json", "-q", *extra]])
        assert code == 0
    return root


def test_cli_generate_equals_generate_of_the_loaded_hf_rewrite(artifact, capsys):
    prompts = _prompts()
    argv = ["generate", artifact / "gen.pt2", "--max-new-tokens", NEW]
    for p in prompts:
        argv += ["--input-ids", ",".join(map(str, p))]
    code, out, err = _cli([*argv, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out) == {"new_tokens": _reference(mr.load(artifact / "hf"), prompts)[0]}
    code, out, err = _cli(argv, capsys)  # without --json: one line per prompt
    assert code == 0 and out.splitlines()[1].startswith("prompt 2: ")


def test_cli_generate_text_prompts_with_the_tokenizer_the_artifact_carries(artifact, capsys):
    """`--prompt` tokenizes with the checkpoint's tokenizer, carried inside the .pt2: the tokens equal
    `generate()` of the hf rewrite on the same ids, the text is their decoding."""
    texts = ["the quick brown fox jumps over the lazy dog.", "hello, world!"]
    tok = _char_tokenizer()
    prompts = [tok(t)["input_ids"] for t in texts]
    assert len(prompts[0]) > 2 * BLOCK  # crosses blocks
    argv = ["generate", artifact / "gen.pt2", "--max-new-tokens", 12]
    for t in texts:
        argv += ["--prompt", t]
    code, out, err = _cli([*argv, "--json"], capsys)
    assert code == 0, err
    want = _reference(mr.load(artifact / "hf"), prompts, 12)[0]
    assert json.loads(out) == {"new_tokens": want, "new_text": [tok.decode(w, skip_special_tokens=True) for w in want]}
    code, out, err = _cli(argv, capsys)
    assert code == 0 and out.splitlines()[1] == f"prompt 1 text: {tok.decode(want[0], skip_special_tokens=True)!r}"


def test_cli_generate_text_prompt_needs_a_tokenizer(artifact, tmp_path, capsys):
    bare = tmp_path / "bare.pt2"  # written by the API without a tokenizer
    save_generation_pt2(mr.export_for_generation(_model("gpt2"), POLICY, max_seq_len=48, batch=1), bare)
    code, out, err = _cli(["generate", bare, "--prompt", "hi", "--max-new-tokens", 2], capsys)
    assert code == cli.EXIT_VALUE and out == ""
    assert err.strip() == ("moba-rewrite: error: --prompt: expected a tokenizer: the artifact carries none (its "
                           "checkpoint had no tokenizer files); give --tokenizer DIR, or token ids with --input-ids")
    code, out, err = _cli(["generate", bare, "--prompt", "hi", "--max-new-tokens", 2, "--tokenizer", artifact / "llama",
                           "--json"], capsys)
    assert code == 0, err
    want = _reference(mr.rewrite(_model("gpt2"), POLICY), [_char_tokenizer()("hi")["input_ids"]], 2)[0]
    assert json.loads(out)["new_tokens"] == want
    code, _, err = _cli(["generate", bare, "--prompt", "hi", "--max-new-tokens", 2, "--tokenizer", tmp_path], capsys)
    assert code == cli.EXIT_VALUE and "--tokenizer: expected a folder with tokenizer files" in err
    code, _, err = _cli(["generate", bare, "--prompt", "hi", "--input-ids", "1", "--max-new-tokens", 2], capsys)
    assert code == cli.EXIT_USAGE and "not allowed with argument" in err


@pytest.mark.parametrize("argv,code,message", [
    (["--input-ids", ",".join(["5"] * 97)], cli.EXIT_VALUE,
     "--input-ids: expected prompts of at most 96 tokens (the exported --max-seq-len), got 97"),
    (["--input-ids", "1,2", "--input-ids", "3", "--input-ids", "4"], cli.EXIT_VALUE,
     "--input-ids: expected at most 2 prompts (the exported batch), got 3"),
    (["--input-ids", "1,64,2"], cli.EXIT_VALUE,
     "--input-ids: expected token ids in 0..63 (the vocabulary), got 64 in prompt 1"),
    (["--input-ids", "1,-1"], cli.EXIT_VALUE, "got -1 in prompt 1"),
    (["--input-ids", ",".join(["5"] * 90), "--max-new-tokens", 8], cli.EXIT_VALUE,
     "--max-new-tokens: expected the longest prompt (90 tokens) plus the new tokens (8) to fit"),
    (["--input-ids", "1,x"], cli.EXIT_USAGE, "expected comma-separated whole numbers"),
])
def test_cli_generate_bad_input_is_one_line_with_its_exit_code(artifact, capsys, argv, code, message):
    if "--max-new-tokens" not in argv:
        argv = [*argv, "--max-new-tokens", 4]
    got, out, err = _cli(["generate", artifact / "gen.pt2", *argv], capsys)
    assert got == code, err
    last = err.strip().splitlines()[-1]  # usage errors (2) print argparse's usage lines above it
    assert last.startswith("moba-rewrite: error: ") and message in last and out == ""
    assert len(err.strip().splitlines()) == 1 or code == cli.EXIT_USAGE


def test_cli_generate_refuses_what_is_not_a_generation_artifact(artifact, tmp_path, capsys):
    code, _, err = _cli(["generate", tmp_path / "none.pt2", "--input-ids", "1", "--max-new-tokens", 1], capsys)
    assert code == cli.EXIT_CHECKPOINT and "no such file" in err
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),)), plain)
    code, _, err = _cli(["generate", plain, "--input-ids", "1", "--max-new-tokens", 1], capsys)
    assert code == cli.EXIT_CHECKPOINT and "expected a generation" in err, err


@pytest.mark.parametrize("extra,code,message", [
    (["--format", "hf", "--generate", "--max-seq-len", 64], cli.EXIT_VALUE,
     "--generate: expected --format pt2, aoti or onnx (generation programs for a decoder with a KV cache), got hf"),
    (["--format", "pt2", "--generate"], cli.EXIT_USAGE, "--generate: expected --max-seq-len N"),
    (["--format", "pt2", "--max-seq-len", 64], cli.EXIT_USAGE, "--max-seq-len: only applies with --generate"),
    (["--format", "pt2", "--generate", "--max-seq-len", 64, "--dynamic"], cli.EXIT_USAGE,
     "--dynamic: does not apply with --generate"),
    (["--format", "pt2", "--generate", "--max-seq-len", 129], cli.EXIT_VALUE,
     "--max-seq-len: expected at most the model's 128 positions, got 129"),
])
def test_cli_rewrite_generate_bad_flags(artifact, tmp_path, capsys, extra, code, message):
    out = tmp_path / ("g" if "hf" in extra else "g.pt2")
    got, _, err = _cli(["rewrite", artifact / "llama", "--policy", artifact / "policy.json", "--out", out, "-q",
                        "--no-progress", *extra], capsys)
    assert got == code, err
    assert message in err and not out.exists()


def test_saved_programs_are_one_pt2_archive(tmp_path):
    from moba_rewrite.exporters.generation import load_generation_programs

    model = _model("gpt2")
    programs = mr.export_for_generation(model, POLICY, max_seq_len=48, batch=1)
    save_generation_pt2(programs, tmp_path / "g.pt2")
    loaded = load_generation_programs(tmp_path / "g.pt2")
    assert loaded.spec == programs.spec
    prompts = [list(range(3, 40))]
    assert greedy(loaded.prefill.module(), loaded.decode.module(), loaded.spec, prompts, 9) == \
        _reference(model, prompts, 9)[0]


def test_mr_load_returns_the_programs_and_other_commands_point_to_generate(artifact, capsys):
    programs = mr.load(artifact / "gen.pt2")
    assert (programs.spec.batch, programs.spec.max_seq_len) == (2, MAX_LEN)
    assert [c["kind"] for c in programs.spec.cache] == ["keys", "values", "means"] * 2
    code, _, err = _cli(["inspect", artifact / "gen.pt2"], capsys)
    assert code == cli.EXIT_ARCHITECTURE and "run it with moba-rewrite generate" in err


def test_aoti_package_generates_in_a_fresh_process_that_imports_only_moba_rewrite(artifact, tmp_path, capsys):
    """One AOTInductor package (a 1-layer Llama: the compile is slow on a CPU), written by the
    command (which verifies it in process), then run by `moba-rewrite generate` in a new process."""
    import subprocess
    import sys

    torch.manual_seed(3)
    cfg = _config("llama")
    cfg.num_hidden_layers = 1
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "llama1")
    out = tmp_path / "gen.aoti.pt2"
    code, _, err = _cli(["rewrite", tmp_path / "llama1", "--policy", artifact / "policy.json", "--format", "aoti",
                         "--generate", "--max-seq-len", 64, "--batch", 2, "--out", out, "-q", "--no-progress"], capsys)
    assert code == 0, err
    prompts = [list(range(3, 40)), list(range(20, 42))]  # 37 and 22 tokens; 20 new: decode crosses 48
    argv = ["generate", str(out), "--max-new-tokens", "20", "--json"]
    for p in prompts:
        argv += ["--input-ids", ",".join(map(str, p))]
    script = ("import sys, json; from moba_rewrite.cli import main; code = main(sys.argv[1:]); "
              "print(json.dumps({'code': code, 'transformers': 'transformers' in sys.modules}))")
    run = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    tokens, status = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert status == {"code": 0, "transformers": False}  # the package needs neither model code nor transformers
    want = _reference(mr.rewrite(model, POLICY), prompts, 20)[0]
    assert tokens == {"new_tokens": want}


@pytest.mark.parametrize("family", ["llama", "qwen2_sliding"])
def test_onnx_programs_in_onnxruntime_generate_what_generate_does(family, tmp_path):
    from moba_rewrite.exporters.onnx_generation import load_generation_onnx, save_generation_onnx

    import onnx

    model = _model(family)
    programs = mr.export_for_generation(model, POLICY, max_seq_len=MAX_LEN, batch=2)
    save_generation_onnx(programs, tmp_path / "gen")
    decode = onnx.load(str(tmp_path / "gen" / "decode.onnx"))
    prefill_proto = onnx.load(str(tmp_path / "gen" / "prefill.onnx"))
    assert sum(n.op_type == "Attention" and n.domain == "com.moba_rewrite" for n in prefill_proto.graph.node) >= 1
    # decode gates on the cached means: the cache node, not Attention on the whole filled prefix
    assert sum(n.op_type == "AttentionKVCache" and n.domain == "com.moba_rewrite" for n in decode.graph.node) >= 1
    assert not any(n.op_type == "Attention" and n.domain == "com.moba_rewrite" for n in decode.graph.node)
    prefill, decode_run, spec = load_generation_onnx(tmp_path / "gen")
    prompts = _prompts()
    assert greedy(prefill, decode_run, spec, prompts, NEW) == _reference(model, prompts)[0]


def test_dense_below_programs_switch_to_moba_when_generate_does(tmp_path):
    """A policy's `dense_below` in generation programs (refused before: the filled length is a
    tensor there): full attention while the cache holds fewer keys (the prefill of 50 and the
    first 13 steps), MoBA after; pt2 and ONNX programs (the decode's cache node switching on
    the device) give `generate()`'s tokens."""
    from moba_rewrite.exporters.onnx_generation import load_generation_onnx, save_generation_onnx

    import onnx

    policy = {"version": 1, "defaults": {"block_size": BLOCK, "top_k": TOP_K, "dense_below": 64}}
    model = mr.rewrite(_model("llama"), policy)
    programs = mr.export_for_generation(model, None, max_seq_len=MAX_LEN, batch=2)
    prompts = _prompts()
    want, want_logits = _reference(model, prompts)
    got, got_logits = _run(programs, prompts)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-4)
    dense, dense_logits = _reference(_model("llama"), prompts)
    torch.testing.assert_close(want_logits, dense_logits, atol=1e-5, rtol=1e-4)  # prefill below 64: full attention
    assert want != dense  # then MoBA
    save_generation_onnx(programs, tmp_path / "gen")
    decode = onnx.load(str(tmp_path / "gen" / "decode.onnx"))
    nodes = [n for n in decode.graph.node if n.domain == "com.moba_rewrite"]  # the cache node, switching itself
    assert nodes and all(n.op_type == "AttentionKVCache" and any(a.name == "dense_below" and a.i == 64
                                                                 for a in n.attribute) for n in nodes)
    prefill, decode_run, spec = load_generation_onnx(tmp_path / "gen")
    assert greedy(prefill, decode_run, spec, prompts, NEW) == want


def test_cli_rewrite_generate_onnx_folder_runs_with_generate(artifact, tmp_path, capsys):
    out = tmp_path / "gen-onnx"
    code, _, err = _cli(["rewrite", artifact / "llama", "--policy", artifact / "policy.json", "--format", "onnx",
                         "--generate", "--max-seq-len", MAX_LEN, "--batch", 2, "--out", out, "-q", "--no-progress"],
                        capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["decode.onnx", "moba_generation.json", "prefill.onnx",
                                                     "tokenizer"]  # the checkpoint's tokenizer, carried
    prompts = _prompts()
    argv = ["generate", out, "--max-new-tokens", 12, "--json"]
    for p in prompts:
        argv += ["--input-ids", ",".join(map(str, p))]
    code, stdout, err = _cli(argv, capsys)
    assert code == 0, err
    assert json.loads(stdout) == {"new_tokens": _reference(mr.load(artifact / "hf"), prompts, 12)[0]}
    tok = _char_tokenizer()
    code, stdout, err = _cli(["generate", out, "--max-new-tokens", 5, "--json", "--prompt", "abc def ghi"], capsys)
    assert code == 0, err
    want = _reference(mr.load(artifact / "hf"), [tok("abc def ghi")["input_ids"]], 5)[0]
    assert json.loads(stdout)["new_tokens"] == want


def test_a_checkpoint_whose_generation_config_processes_logits_exports_and_says_so(tmp_path, capsys):
    """Checkpoints often ship logits processing in generation_config.json (Qwen2.5's repetition
    penalty). The written programs are checked against greedy `generate()` without it (the runner
    takes the argmax; before, the check ran `generate()` with the penalty and refused to write the
    artifact when a token differed), and `generate` says in one note that it does not apply it."""
    from moba_rewrite.cli.generation_artifact import plain_generation_config

    model = _model("llama")
    model.generation_config.no_repeat_ngram_size = 1  # no token twice, prompt included
    model.generation_config.repetition_penalty = 3.0
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "policy.json").write_text(json.dumps(POLICY))
    code = cli.main([str(a) for a in ["rewrite", tmp_path / "ckpt", "--policy", tmp_path / "policy.json", "-q",
                                      "--format", "pt2", "--generate", "--max-seq-len", MAX_LEN,
                                      "--out", tmp_path / "gen.pt2"]])
    assert code == 0
    capsys.readouterr()  # save_pretrained's progress bar
    prompt = _prompts()[0]
    code, out, err = _cli(["generate", tmp_path / "gen.pt2", "--input-ids", ",".join(map(str, prompt)),
                           "--max-new-tokens", 12, "--json"], capsys)
    assert code == 0, err
    assert err.strip() == (f"note: {tmp_path / 'gen.pt2'}: the checkpoint's generation config sets "
                           f"repetition_penalty=3.0, no_repeat_ngram_size=1, which transformers' generate() applies; "
                           f"this command decodes by plain argmax without them")
    rewritten = mr.rewrite(_model("llama"), POLICY)
    with_processing = mr.rewrite(_model("llama"), POLICY)
    with_processing.generation_config.no_repeat_ngram_size = 1
    with plain_generation_config(with_processing):
        plain = _reference(with_processing, [prompt], 12)[0]
    assert json.loads(out) == {"new_tokens": plain} and plain == _reference(rewritten, [prompt], 12)[0]
    processed = _reference(with_processing, [prompt], 12)[0]
    assert processed != plain and len(set(processed[0]) | set(prompt)) == len(processed[0]) + len(set(prompt))
