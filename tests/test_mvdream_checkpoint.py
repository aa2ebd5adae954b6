"""MVDream's checkpoint loader (threed/guidance/mvdream_checkpoint.py).

- The official file's key layout (tests/data/mvdream/official-keys.txt.gz, recorded from the reference's own
  model at full size by tests/data/mvdream/make_keys.py) maps onto threed's three modules: every key used
  or deliberately ignored, nothing missing, shapes equal.
- A tiny checkpoint in the same layout (tests/tiny_models.py, keys recorded from the reference at a tiny
  size) loads from its file and its folder; its text encoder gives what open_clip's own text tower gives at
  the penultimate layer (the reference's FrozenOpenCLIPEmbedder), which pins the q/k/v split and the layer.
- Bad paths, foreign files and an offline hub id stop at once with one line naming what to download.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import pytest
import torch

from threed.errors import UserError
from threed.guidance import mvdream_checkpoint as mc
from tiny_models import build_tiny_mvdream

DATA = Path(__file__).parent / "data" / "mvdream"


def _meta_state(name: str) -> dict[str, torch.Tensor]:
    state = {}
    with gzip.open(DATA / name, "rt") as f:
        for line in f:
            key, shape = line.rstrip("\n").split("\t")
            state[key] = torch.empty([int(x) for x in shape.split("x")] if shape else [], device="meta")
    return state


def test_every_official_key_maps_onto_the_modules_with_its_shape():
    state = _meta_state("official-keys.txt.gz")
    assert len(state) == 1244
    unet, vae, text = mc.build_modules()
    assert mc.text_config(state) == mc.SD21_TEXT
    parts = mc.split_checkpoint(state, text_into=mc.text_key_prefix(text))
    assert parts.unused == []
    last = "cond_stage_model.model.transformer.resblocks.23."
    assert set(parts.ignored) == ({*mc.SCHEDULE_BUFFERS, "cond_stage_model.model.text_projection",
                                   "cond_stage_model.model.logit_scale"} | {k for k in state if k.startswith(last)})
    # 690 UNet and 248 VAE tensors one to one; the text tower's 294 keys less 14 ignored, its 23 in_proj
    # weights and biases each split in three.
    assert (len(parts.unet), len(parts.vae), len(parts.text)) == (690, 248, 294 - 14 + 23 * 2 * 2)
    for module, weights in ((unet, parts.unet), (vae, parts.vae), (text, parts.text)):
        expected = module.state_dict()
        assert set(weights) == set(expected)
        assert all(tuple(weights[k].shape) == tuple(v.shape) for k, v in expected.items())


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mvdream(tmp_path_factory.mktemp("mvdream"))


def test_tiny_checkpoint_loads_from_file_and_folder(tiny_ckpt: Path):
    model = mc.load_mvdream(str(tiny_ckpt))
    assert model.unet.config.cross_attention_dim == 64 and model.text_encoder.config.num_hidden_layers == 1
    assert torch.allclose(model.scheduler.betas[[0, -1]], torch.tensor([0.00085, 0.012]))
    again = mc.load_mvdream(str(tiny_ckpt.parent))
    assert torch.equal(again.unet.conv_in.weight, model.unet.conv_in.weight)
    x = torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        eps = model.unet(x, torch.tensor([500] * 4), torch.randn(4, 77, 64), camera=torch.randn(4, 16), num_frames=4)
        z = model.vae.encode(torch.rand(1, 3, 16, 16) * 2 - 1).latent_dist.mean
    assert eps.shape == x.shape and z.shape == (1, 4, 8, 8)


def test_text_encoder_is_open_clips_penultimate_layer(tiny_ckpt: Path):
    """The reference embeds a prompt with open_clip's tower: token + positional embedding, all blocks but the
    last under the causal mask, then ln_final. The loaded CLIPTextModel's last hidden state must equal it."""
    import open_clip
    from open_clip.transformer import TextTransformer

    model = mc.load_mvdream(str(tiny_ckpt))
    state = torch.load(tiny_ckpt, weights_only=True)
    tower = TextTransformer(width=64, heads=1, layers=2, output_dim=64)
    own = {k[len(mc.TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(mc.TEXT_PREFIX)}
    missing, unexpected = tower.load_state_dict(own, strict=False)
    assert not missing and set(unexpected) <= {"logit_scale"}
    tokens = model.tokenizer(["a yellow rubber duck", "an owl"])
    with torch.no_grad():
        x = tower.token_embedding(tokens) + tower.positional_embedding
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, attn_mask=tower.attn_mask)
        expected = tower.ln_final(x)
        got = model.text_encoder(tokens).last_hidden_state
    assert isinstance(model.tokenizer, open_clip.tokenizer.SimpleTokenizer)
    assert torch.allclose(got, expected, atol=1e-5)


def test_bad_paths_and_files_fail_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    started = time.perf_counter()
    for model, words in ((mc.DEFAULT_MODEL, "not in the Hugging Face cache"),
                         (str(tmp_path / "nope.pt"), "does not exist"),
                         (str(tmp_path / "nope"), "does not exist")):
        with pytest.raises(UserError) as err:
            mc.load_mvdream(model)
        msg = str(err.value)
        assert words in msg and "\n" not in msg
        assert "hf download MVDream/MVDream sd-v2.1-base-4view.pt" in msg and "about 5 GB" in msg
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read MVDream checkpoint"):
        mc.load_mvdream(str(garbage))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match="is not an MVDream checkpoint"):
        mc.load_mvdream(str(foreign))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds 0 checkpoints"):
        mc.load_mvdream(str(empty))
    assert time.perf_counter() - started < 10


def test_a_folder_in_threeds_layout_loads(tmp_path: Path):
    """unet/, vae/, text_encoder/ as save_pretrained writes them (threed/random_models.py, for timings)."""
    from threed.random_models import build_random_mvdream

    folder = build_random_mvdream(tmp_path / "mv", tiny=True)
    model = mc.load_mvdream(str(folder))
    assert model.unet.config.class_embed_type == "projection" and model.unet.config.cross_attention_dim == 64
    assert type(model.unet.attn_processors[next(iter(model.unet.attn_processors))]).__name__ == "MultiViewAttnProcessor"
    with torch.no_grad():
        eps = model.unet(torch.randn(4, 4, 8, 8), torch.tensor([10] * 4), torch.randn(4, 77, 64),
                         camera=torch.randn(4, 16), num_frames=4)
    assert eps.shape == (4, 4, 8, 8)
