"""CDPruner against the official implementation's recorded outputs (../shared/fixtures/cdpruner: the compared
tensors, and the recorded relevance, CLIP text rows and greedy order), an independent float64 reference of its DPP
(greedy by log-determinants), per-call instructions (tokenreduce.instructions) in batched generation, and errors."""
import json
import string

import pytest
import torch
from safetensors.torch import load_file

import tokenreduce
from tokenreduce.methods.cdpruner import CDPruner
from tokenreduce.ops.cdpruner import conditional_kernel, dpp_greedy, instruction_relevance, segment_ids

from ..conftest import FIXTURES, _load_checker, fixture_cases
from ..llava_helpers import pixels, run_llava_case, tiny_llava, transformers
from ._tower_checks import PATCHES, WIDTH, check_batch_equals_alone, check_keep_all_is_unpatched, geometry

CLIP_POSITIONS = 8  # the tiny text tower's positions: an instruction of more than 8 ids spans several rows


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel for the tiny LLaVA (vision width 32), with a CLIP tokenizer of single letters."""
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=CLIP_POSITIONS, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=56, patch_size=7),
        projection_dim=16)
    torch.manual_seed(0)
    clip = transformers.CLIPModel(cfg)
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp("clip")
    clip.save_pretrained(path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    return str(path)


def _ids(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(2, 54, (n - 2,), generator=g).tolist() + [1]


# ---------------------------------------------------------------------------------------------------------------
# the official code's recorded outputs
@pytest.mark.parametrize("case", fixture_cases("cdpruner", call="llava"))
def test_llava_fixture(case):
    ok, msgs = run_llava_case("cdpruner", case)
    assert ok, msgs


@pytest.mark.parametrize("case", fixture_cases("cdpruner", call="llava"))
def test_text_rows_relevance_and_greedy_order_match_upstream(case):
    """The instruction's rows of 77 ids, the normalised relevance (upstream's float32 values) and the whole greedy
    order of the DPP, from the same model and image."""
    spec = json.loads((FIXTURES / "cdpruner" / f"{case}.json").read_text())
    t = load_file(str(FIXTURES / "cdpruner" / f"{case}.safetensors"))
    rows, mask = segment_ids(spec["params"]["instruction_ids"], 77)
    assert torch.equal(rows, t["clip_text_input_ids"]) and torch.equal(mask, t["clip_text_attention_mask"])
    checker = _load_checker("check_llava_fixtures")
    path = str(FIXTURES / "cdpruner" / f"{case}.json")
    model = checker.build(path, spec["model"])
    tokenreduce.patch(model, "cdpruner", **checker.resolve_params(path, spec["params"]))
    method, seen = tokenreduce.method_of(model), {}
    relevance = method.relevance
    method.relevance = lambda state, dtype: seen.setdefault("rel", relevance(state, dtype))
    reduce = method.reduce
    method.reduce = lambda state: seen.setdefault("state", state) and reduce(state)
    with torch.no_grad():
        model.get_image_features(pixel_values=t["pixel_values"].double())
    torch.testing.assert_close(seen["rel"], t["relevance"], atol=2e-6, rtol=1e-5)
    kernel = conditional_kernel(seen["state"].projected, seen["rel"], torch.float64)
    assert torch.equal(dpp_greedy(kernel, spec["params"]["keep"]), t["selection_order"])


# ---------------------------------------------------------------------------------------------------------------
# independent references
def _greedy_by_determinants(kernel, k):
    """Greedy MAP of a DPP without Cholesky updates: each step adds the token that maximises det(L[S, S])."""
    chosen = []
    for _ in range(k):
        best, best_det = None, None
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            s = chosen + [j]
            det = float(torch.linalg.det(kernel[s][:, s]))
            if best_det is None or det > best_det:
                best, best_det = j, det
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("k", [1, 5, 12])
def test_dpp_matches_greedy_by_determinants(k):
    g = torch.Generator().manual_seed(k)
    feats = torch.randn(2, 20, 24, generator=g, dtype=torch.float64)
    rel = torch.rand(2, 20, generator=g, dtype=torch.float64) + 0.1
    kernel = conditional_kernel(feats, rel, torch.float64)
    got = dpp_greedy(kernel, k)
    for b in range(2):
        assert got[b].tolist() == _greedy_by_determinants(kernel[b], k)


def test_relevance_by_loops():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    cos = [[float(img[i] @ txt[m] / (img[i].norm() * txt[m].norm())) for m in range(3)] for i in range(9)]
    raw = [-sum(row) / 3 for row in cos]
    lo, hi = min(raw), max(raw)
    want = torch.tensor([(r - lo + 1e-6) / (hi - lo) for r in raw], dtype=torch.float64)
    torch.testing.assert_close(instruction_relevance(img, txt), want, atol=1e-12, rtol=1e-12)


def test_rank_deficient_kernel_gives_distinct_tokens_without_nan():
    feats = torch.randn(1, 12, 3, dtype=torch.float64)  # rank 3 < k
    kernel = conditional_kernel(feats, torch.ones(1, 12, dtype=torch.float64), torch.float64)
    got = dpp_greedy(kernel, 8)[0].tolist()
    assert len(set(got)) == 8


def test_segment_ids():
    rows, mask = segment_ids(list(range(1, 11)), 4)
    assert rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]


# ---------------------------------------------------------------------------------------------------------------
# on the tiny LLaVA: per-call instructions
def test_batched_generate_with_per_sample_instructions_equals_each_alone(clip_dir):
    """Three prompts, three instructions (one longer than the text tower's positions: two rows)."""
    instructions = [_ids(1, 5), _ids(2, 13), _ids(3, 7)]
    check_batch_equals_alone("cdpruner", dict(keep=10, text_encoder=clip_dir), keep=10, instructions=instructions)


def test_the_instruction_conditions_the_selection(clip_dir):
    model = tiny_llava(vision_layers=2, lm_layers=1)
    a, b = _ids(4, 6), _ids(5, 6)
    tokenreduce.patch(model, "cdpruner", keep=10, text_encoder=clip_dir, instruction_ids=a)
    px = pixels(2)

    def kept():
        with torch.no_grad():
            model.get_image_features(pixel_values=px)
        return tokenreduce.info(model).kept[0]

    default = kept()
    with tokenreduce.instructions(model, [a, a]):
        assert torch.equal(kept(), default)  # the per-call instruction replaces instruction_ids
    with tokenreduce.instructions(model, [b, a]):
        mixed = kept()
    assert torch.equal(mixed[1], default[1]) and not torch.equal(mixed[0], default[0])
    with tokenreduce.instructions(model, "ab cd"):  # a string goes through text_encoder's tokenizer
        by_text = kept()
    with tokenreduce.instructions(model, [[0, 2, 5, 6, 9, 1]] * 2):  # what that tokenizer gives for "ab cd"
        assert torch.equal(kept(), by_text)
    with tokenreduce.instructions(model, [a, b, a]), pytest.raises(ValueError, match="gave 3 instructions"):
        kept()


def test_keep_all_is_unpatched(clip_dir):
    check_keep_all_is_unpatched("cdpruner", dict(keep=PATCHES, text_encoder=clip_dir, instruction_ids=_ids(6, 5)))


def test_errors(clip_dir, tmp_path):
    model = tiny_llava(vision_layers=2, lm_layers=1)
    with pytest.raises(ValueError, match="needs text_encoder"):
        tokenreduce.patch(model, "cdpruner", keep=8)
    with pytest.raises(ValueError, match="could not load text_encoder"):
        tokenreduce.patch(model, "cdpruner", keep=8, text_encoder=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="exceeds the 64 patch tokens"):
        tokenreduce.patch(model, "cdpruner", keep=80, text_encoder=clip_dir)
    with pytest.raises(ValueError, match="is 64 wide"):
        CDPruner(geometry(1, PATCHES, dim=64), keep=8, text_encoder=clip_dir)
    with pytest.raises(TypeError, match="one instruction per image"):
        tokenreduce.patch(model, "cdpruner", keep=8, text_encoder=clip_dir)
        with tokenreduce.instructions(model, [0, 5, 1]):
            pass
    with pytest.raises(ValueError, match="ids >= 64"):
        tokenreduce.patch(model, "cdpruner", keep=8, text_encoder=clip_dir, instruction_ids=[0, 70, 1])
    tokenreduce.patch(model, "cdpruner", keep=8, text_encoder=clip_dir)
    with pytest.raises(ValueError, match="wrap the call in"):
        with torch.no_grad():
            model.get_image_features(pixel_values=pixels(1))
    (tmp_path / "notok").mkdir()
    transformers.CLIPModel.from_pretrained(clip_dir).save_pretrained(tmp_path / "notok")  # no tokenizer files
    tokenreduce.patch(model, "cdpruner", keep=8, text_encoder=str(tmp_path / "notok"))
    with tokenreduce.instructions(model, "ab"), pytest.raises(ValueError, match="give CLIP token ids"):
        with torch.no_grad():
            model.get_image_features(pixel_values=pixels(1))
    served = tokenreduce.build_method("cdpruner", geometry(1, 576), visual_token_num=128, text_encoder=clip_dir)
    assert served.num_output(577) == 128
