"""The judge panel (independent classifiers) and the one counterfactual pass that uses it:
what the pass records equals a recomputation by hand, judges are trained and loaded from
weights-only files, a luminance judge cannot see colour, and nothing the model trains
against is a judge."""

import json
import subprocess
import sys

import pytest
import torch

from galcf_hpc.config import config_from_dict
from galcf_hpc.data.classes import CLASS_NAMES, NUM_CLASSES
from galcf_hpc.errors import ConfigError
from galcf_hpc.judges import DEFAULT_PANEL, load_judges, train_judges
from galcf_hpc.judges.nets import PlainCNN, ResNet, build_judge, load_judge
from galcf_hpc.metrics import confusion_matrix, luminance_share, ssim
from galcf_hpc.model.evaluation import Accumulator, explain_batch
from galcf_hpc.model.galcf import GalaxyCF
from galcf_hpc.train.objective import batch_losses


def tiny_model(seed=0, z2_critic=False):
    torch.manual_seed(seed)
    return GalaxyCF(16, [8, 16], 12, 6, 2, 16, 2.0, 5.0, seed=seed, z2_critic=z2_critic).eval()


def tiny_judges():
    torch.manual_seed(5)
    return {
        "cnn": build_judge("plain_cnn", [8, 16], "colour").eval(),
        "grey": build_judge("resnet", [8, 16], "luminance").eval(),
    }


def test_pass_equals_recomputation_by_hand():
    model, judges = tiny_model(), tiny_judges()
    images = torch.rand(7, 3, 16, 16)
    targets = [0, 3, 9]
    out = explain_batch(model, images, targets, margin=1.0, judges=judges, keep_images=True, overlay=True)
    cls = model.classify(images)
    assert torch.equal(out.pred, cls.pred)
    recon = model.decoder(cls.z)
    for j, t in enumerate(targets):
        sel = cls.pred != t
        assert torch.equal(out.mask[:, j], sel)
        assert (out.valid["model"][~sel, j] == -1).all() and torch.isnan(out.change["ssim_rec"][~sel, j]).all()
        if not bool(sel.any()):
            continue
        target = torch.full_like(cls.pred[sel], t)
        x_cf, _ = model.counterfactual(cls.z[sel], cls.h[sel], cls.pred[sel], target, 1.0)
        assert torch.allclose(out.cf_images[sel, j], x_cf, atol=1e-6)
        assert torch.equal(out.valid["model"][sel, j], (model.classify(x_cf).pred == t).to(torch.int8))
        shown = (images[sel] + x_cf - recon[sel]).clamp(0, 1)  # what the grid shows
        for name, judge in judges.items():
            assert torch.equal(out.valid[name][sel, j], (judge(x_cf).argmax(1) == t).to(torch.int8))
            assert torch.equal(out.valid_overlay[name][sel, j], (judge(shown).argmax(1) == t).to(torch.int8))
            assert (out.valid_overlay[name][~sel, j] == -1).all()
        assert torch.allclose(out.change["ssim_rec"][sel, j], ssim(x_cf, recon[sel]), atol=1e-5)
        assert torch.allclose(out.change["luminance_share"][sel, j], luminance_share(x_cf - recon[sel]), atol=1e-5)
    # chunked decoding gives the same numbers
    chunked = explain_batch(model, images, targets, margin=1.0, judges=judges, chunk=4)
    assert chunked.valid_overlay == {}  # only when asked for
    for name in out.valid:
        assert torch.equal(chunked.valid[name], out.valid[name])
    assert torch.allclose(chunked.change["msd_rec"], out.change["msd_rec"], equal_nan=True)


def test_accumulator_means_and_panel_agreement():
    model, judges = tiny_model(), tiny_judges()
    acc = Accumulator(range(NUM_CLASSES), NUM_CLASSES, judges)
    outs, labels = [], []
    for seed in range(2):
        torch.manual_seed(seed)
        images, lab = torch.rand(6, 3, 16, 16), torch.randint(0, NUM_CLASSES, (6,))
        out = explain_batch(model, images, range(NUM_CLASSES), 1.0, judges, overlay=True)
        acc.add(out, lab)
        outs.append(out)
        labels.append(lab)
    s = acc.summary(CLASS_NAMES)
    mask = torch.cat([o.mask for o in outs])
    votes = {n: torch.cat([o.valid[n] for o in outs]).double() for n in ("model", "cnn", "grey")}
    assert s["overall"]["n"] == int(mask.sum())
    for n in votes:
        assert s["overall"][f"validity_{n}"] == pytest.approx(float(votes[n][mask].mean()))
    both = (votes["cnn"] == 1) & (votes["grey"] == 1)
    assert s["overall"]["panel_all"] == pytest.approx(float(both[mask].double().mean()))
    panel = (votes["cnn"] + votes["grey"]) / 2
    assert s["overall"]["validity_panel"] == pytest.approx(float(panel[mask].mean()))
    shown = {n: torch.cat([o.valid_overlay[n] for o in outs]).double() for n in ("cnn", "grey")}
    assert s["overall"]["overlay_validity_cnn"] == pytest.approx(float(shown["cnn"][mask].mean()))
    shown_panel = (shown["cnn"] + shown["grey"]) / 2
    assert s["overall"]["overlay_validity_panel"] == pytest.approx(float(shown_panel[mask].mean()))
    assert s["num_galaxies"] == 12
    assert s["judges"]["cnn"]["num_galaxies"] == 12
    # the judges on the reconstructions x~ of the same galaxies, not on the inputs
    for n, judge in judges.items():
        on_recon = torch.cat([judge(o.recon).argmax(1) for o in outs])
        assert torch.equal(torch.cat([o.judge_recon_pred[n] for o in outs]), on_recon)
        expected = confusion_matrix(torch.cat(labels), on_recon, NUM_CLASSES)
        assert s["judges_on_reconstructions"][n]["confusion_matrix"] == expected.tolist()
        assert s["judges_on_reconstructions"][n]["accuracy"] == pytest.approx(float(expected.trace()) / 12)
    assert not explain_batch(model, images, [0], 1.0, judges, judge_inputs=False).judge_recon_pred


def test_luminance_judge_cannot_see_colour():
    judge = build_judge("resnet", [8, 16], "luminance").eval()
    x = torch.rand(4, 3, 16, 16) * 0.5 + 0.25
    shift = 0.1 * torch.randn(4, 1, 16, 16)
    recoloured = x + torch.cat([shift, -shift, torch.zeros_like(shift)], dim=1)
    with torch.no_grad():
        assert torch.allclose(judge(x), judge(recoloured), atol=1e-5)
        colour = build_judge("resnet", [8, 16], "colour").eval()
        assert not torch.allclose(colour(x), colour(recoloured), atol=1e-4)


def test_objective_never_imports_or_calls_a_judge(monkeypatch):
    """The training side must not load the judge package, and a training step with every
    objective term on must not run any judge network."""
    code = (
        "import sys, galcf_hpc.train.loop, galcf_hpc.train.objective, galcf_hpc.train.engines; "
        "print(sorted(m for m in sys.modules if m.startswith(('galcf_hpc.judges', 'galcf_hpc.baseline'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

    def refuse(self, x):
        raise AssertionError("a judge ran inside the training objective")

    monkeypatch.setattr(PlainCNN, "forward", refuse)
    monkeypatch.setattr(ResNet, "forward", refuse)
    cfg = config_from_dict(
        {
            "data": {"image_size": 16},
            "model": {"channels": [8, 16]},
            "loss": {
                "perceptual": 0.0,
                "z2_adversary": 1.0,
                "cf_critic": 1.0,
                "cf_critic_colour": 1.0,
                "cf_critic_family": "both",
                "cf_augment": True,
                "cf_placement": "interpolate",
            },
        }
    )
    model = GalaxyCF.from_config(cfg).train()
    total, terms = batch_losses(model, None, torch.rand(8, 3, 16, 16), torch.arange(8) % NUM_CLASSES, cfg.loss, True)
    total.backward()
    assert {"cf", "z2_critic", "mmd", "ib", "critic_real", "cf_critic"} <= set(terms)
    assert model.z2_critic[0].weight.grad is not None and model.critic.head[-1].weight.grad is not None


def test_train_panel_and_load_it(sharded, tmp_path):
    cfg = config_from_dict(
        {
            "run": {"out_dir": str(tmp_path / "run"), "seed": 1},
            "data": {"shards": str(sharded.out), "image_size": 16, "crop_fraction": 0.7, "loader": "torch"},
            "model": {"channels": [8, 16]},
            "train": {"batch_size": 16, "threads": 1},
            "explain": {"batch_size": 32},
        }
    )
    judges, note = load_judges(tmp_path / "run")
    assert judges == {} and "galcf-hpc judges train" in note
    results = train_judges(cfg, names=["cnn", "resnet_grey"], epochs=1)
    assert set(results) == {"cnn", "resnet_grey"}
    judges, note = load_judges(tmp_path / "run")
    assert set(judges) == {"cnn", "resnet_grey"} and "resnet" in note
    for name in judges:
        state = torch.load(tmp_path / "run" / "judges" / name / "model.pt", weights_only=True)
        assert state["format"] == "galcf-hpc-judge/1"
        ev = json.loads((tmp_path / "run" / "judges" / name / "eval.json").read_text())
        assert ev["num_galaxies"] == sum(int(v) for v in ev["confusion_matrix"][0]) + sum(
            sum(row) for row in ev["confusion_matrix"][1:]
        )
        assert 0.0 <= ev["accuracy"] <= 1.0
    grey, state = load_judge(tmp_path / "run" / "judges" / "resnet_grey" / "model.pt")
    assert state["input"] == "luminance" and grey.input == "luminance"
    panel = json.loads((tmp_path / "run" / "judges" / "panel.json").read_text())
    assert set(panel) == {"cnn", "resnet_grey"}
    with pytest.raises(Exception, match="unknown judge"):
        train_judges(cfg, names=["oracle"])
    assert [s.name for s in DEFAULT_PANEL] == ["cnn", "resnet", "resnet_grey"]


def test_judges_trained_side_by_side_equal_judges_trained_alone(sharded, tmp_path):
    """The panel trains in lockstep over one loader pass; each judge keeps its own random
    numbers (init, dropout, augmentation), so its weights equal those of the same judge
    trained alone. The judges' batch is judges.batch_size, not the per-rank train.batch_size."""

    def cfg(out, **judges):
        return config_from_dict(
            {
                "run": {"out_dir": str(tmp_path / out), "seed": 3},
                "data": {"shards": str(sharded.out), "image_size": 16, "crop_fraction": 0.7, "loader": "torch"},
                "model": {"channels": [8, 16]},
                "train": {"batch_size": 7, "threads": 1},
                "judges": {"batch_size": 32, **judges},
            }
        )

    together = train_judges(cfg("together"), names=["cnn", "resnet_grey"], epochs=2)
    alone = train_judges(cfg("alone"), names=["cnn"], epochs=2)
    assert together["cnn"]["history"] == alone["cnn"]["history"]
    a = torch.load(tmp_path / "together" / "judges" / "cnn" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "alone" / "judges" / "cnn" / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from galcf_hpc.loaders.split import open_split, steps_per_epoch

    split = sharded.out / "train"
    n = open_split(split)[0]["num_samples"]
    settings = together["resnet_grey"]["settings"]
    assert (settings["epochs"], settings["batch_size"]) == (2, 32)
    assert settings["steps_per_epoch"] == steps_per_epoch(split, n, 32, 1, True) < steps_per_epoch(split, n, 7, 1, True)
    other = train_judges(cfg("other", batch_size=64), names=["cnn"], epochs=2)
    assert other["cnn"]["history"] != alone["cnn"]["history"]


def test_judges_train_at_the_runs_precision(sharded, tmp_path, monkeypatch):
    """With train.cpu_bf16 (on a CPU that computes bf16 natively) the judges' convolutions run
    in bf16 while their weights, loss and saved model stay fp32; the numbers stay close to
    the fp32 judge's of the same seed. Without the key nothing runs in bf16."""
    import galcf_hpc.device as device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    seen = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            seen.append(output.dtype)

    def cfg(out, bf16):
        return config_from_dict(
            {
                "run": {"out_dir": str(tmp_path / out), "seed": 3},
                "data": {"shards": str(sharded.out), "image_size": 16, "crop_fraction": 0.7, "loader": "torch"},
                "model": {"channels": [8, 16]},
                "train": {"threads": 1, "cpu_bf16": bf16},
                "judges": {"batch_size": 32},
            }
        )

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        fp32 = train_judges(cfg("fp32", False), names=["cnn"], epochs=2)["cnn"]
        assert seen and set(seen) == {torch.float32}
        seen.clear()
        bf16 = train_judges(cfg("bf16", True), names=["cnn"], epochs=2)["cnn"]
        assert seen and set(seen) == {torch.bfloat16}
    finally:
        hook.remove()
    assert (fp32["settings"]["precision"], bf16["settings"]["precision"]) == ("fp32", "bf16")
    state = torch.load(tmp_path / "bf16" / "judges" / "cnn" / "model.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    first = fp32["history"][0]["loss"], bf16["history"][0]["loss"]
    assert first[0] != first[1] and abs(first[0] - first[1]) < 0.03 * first[0]


def test_damaged_judge_file_is_named(tmp_path):
    bad = tmp_path / "judges" / "cnn" / "model.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match=str(bad)):
        load_judges(tmp_path)


def test_critic_and_encoder_do_not_learn_from_counterfactuals():
    """On decoded counterfactuals only the decoder learns: the encoder, flow and luminance
    critic are frozen there, so they cannot agree with the decoder on a private code."""
    from galcf_hpc.train.objective import consistency_loss

    cfg = config_from_dict(
        {"data": {"image_size": 16}, "model": {"channels": [8, 16]}, "loss": {"cf_critic": 1.0, "cf_augment": True}}
    )
    model = GalaxyCF.from_config(cfg).train()
    lat = model(torch.rand(6, 3, 16, 16))
    terms = consistency_loss(model, lat.z.detach(), lat.h.detach(), lat.recon.detach(), cfg.loss)
    (terms["cf"] + terms["cf_l1"] + terms["cf_z2"]).backward()
    assert all(p.grad is None for p in model.critic.parameters())
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.flow.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.decoder.parameters())


def test_ssim_proximity_is_one_minus_the_reported_ssim_and_moves_only_the_decoder(monkeypatch):
    """loss.cf_ssim: 1 - SSIM(x_cf, x~), the similarity the evaluation reports (metrics.ssim);
    absent at weight 0; its gradient reaches the decoder, not the frozen encoder."""
    import galcf_hpc.train.objective as objective
    from galcf_hpc.metrics import ssim

    cfg = config_from_dict({"data": {"image_size": 16}, "model": {"channels": [8, 16]}, "loss": {"cf_ssim": 2.0}})
    model = GalaxyCF.from_config(cfg).train()
    decoded = []
    real_decoder = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda z: decoded.append(out := real_decoder(z)) or out)
    lat = model(torch.rand(6, 3, 16, 16))
    recon = lat.recon.detach()
    terms = objective.consistency_loss(model, lat.z.detach(), lat.h.detach(), recon, cfg.loss)
    expected = 1.0 - ssim(decoded[-1].detach(), recon).mean()
    value = float(terms["cf_ssim"].detach())
    assert 0.0 < value < 2.0 and abs(value - float(expected)) < 1e-6
    model.zero_grad()
    terms["cf_ssim"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.decoder.parameters())
    off = config_from_dict({"data": {"image_size": 16}, "model": {"channels": [8, 16]}}).loss
    assert "cf_ssim" not in objective.consistency_loss(model, lat.z.detach(), lat.h.detach(), recon, off)


def test_reconstruction_ssim_is_one_minus_the_ssim_of_x_tilde_and_x():
    """loss.rec_ssim: 1 - SSIM(x~, x) joins L_R at its weight (the total grows by exactly
    weight x term, from the same seeds, and so does the decoder's gradient); absent at weight 0."""
    images, labels = torch.rand(6, 3, 16, 16), torch.arange(6) % NUM_CLASSES

    def run(weight):
        cfg = config_from_dict(
            {
                "data": {"image_size": 16},
                "model": {"channels": [8, 16]},
                "loss": {"perceptual": 0.0, "rec_ssim": weight},
            }
        )
        torch.manual_seed(1)
        model = GalaxyCF.from_config(cfg).train()
        torch.manual_seed(2)
        total, terms = batch_losses(model, None, images, labels, cfg.loss, False)
        total.backward()
        return model, float(total.detach()), terms, [p.grad.clone() for p in model.decoder.parameters()]

    model, total, terms, grads = run(3.0)
    _, total_off, terms_off, grads_off = run(0.0)
    assert "rec_ssim" not in terms_off
    model.zero_grad()
    term = 1.0 - ssim(model(images).recon, images).mean()
    (3.0 * term).backward()
    assert 0.1 < float(terms["rec_ssim"]) < 2.0 and abs(float(terms["rec_ssim"]) - term.item()) < 1e-5
    assert abs(total - total_off - 3.0 * term.item()) < 1e-4
    for g, g_off, p in zip(grads, grads_off, model.decoder.parameters()):
        assert torch.allclose(g - g_off, p.grad, atol=1e-5)
    assert sum(float(p.grad.abs().sum()) for p in model.decoder.parameters()) > 0


def test_critic_augment_shows_the_critics_other_images_than_the_encoder(monkeypatch):
    """loss.cf_critic_augment: each critic reads x_cf under its own random symmetry while the
    explained model's encoder reads x_cf as decoded; loss.cf_critic_margin switches the
    critics' terms to the hinge."""
    import galcf_hpc.train.objective as objective

    seen = {"critic": [], "colour": [], "encoder": []}
    cfg = config_from_dict(
        {
            "data": {"image_size": 16},
            "model": {"channels": [8, 16]},
            "loss": {"cf_critic": 1.0, "cf_critic_colour": 1.0, "cf_critic_augment": True, "cf_critic_margin": 3.0},
        }
    )
    model = GalaxyCF.from_config(cfg).train()
    real_call, decoded = objective.functional_call, []

    def recording_call(module, params, args):
        name = {id(model.critic): "critic", id(model.colour_critic): "colour", id(model.encoder): "encoder"}
        if id(module) in name:
            seen[name[id(module)]].append(args[0].detach().clone())
        return real_call(module, params, args)

    real_decoder = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda z: decoded.append(out := real_decoder(z)) or out)
    monkeypatch.setattr(objective, "functional_call", recording_call)
    margins = []
    real_loss = objective.critic_loss
    monkeypatch.setattr(objective, "critic_loss", lambda lg, t, m=0.0: margins.append(m) or real_loss(lg, t, m))
    lat = model(torch.rand(6, 3, 16, 16))
    objective.consistency_loss(model, lat.z.detach(), lat.h.detach(), lat.recon.detach(), cfg.loss)
    x_cf = decoded[-1].detach()
    assert torch.equal(seen["encoder"][0], x_cf)  # the model's own encoder: x_cf as decoded
    for name in ("critic", "colour"):
        assert seen[name][0].shape == x_cf.shape and not torch.equal(seen[name][0], x_cf)
    assert not torch.equal(seen["critic"][0], seen["colour"][0])  # each critic its own draw
    assert margins == [3.0, 3.0]


def test_interpolated_training_counterfactuals_lie_along_the_placement_path(monkeypatch):
    """loss.cf_placement: interpolate puts each training counterfactual's h at its own random
    fraction of the way from the boundary placement to the translated one."""
    import galcf_hpc.train.objective as objective
    from galcf_hpc.model.counterfactual import counterfactual_h

    cfg = config_from_dict(
        {"data": {"image_size": 16}, "model": {"channels": [8, 16]}, "loss": {"cf_placement": "interpolate"}}
    )
    model = GalaxyCF.from_config(cfg).train()
    calls = []
    real = model.counterfactual_latent
    monkeypatch.setattr(model, "counterfactual_latent", lambda *a: calls.append((a, out := real(*a))) or out)
    torch.manual_seed(3)
    lat = model(torch.rand(12, 3, 16, 16))
    objective.consistency_loss(model, lat.z.detach(), lat.h.detach(), lat.recon.detach(), cfg.loss)
    (z, h, pred, target, margin, placement), (_, h_cf) = calls[-1]
    assert torch.is_tensor(placement) and placement.shape == (12,)
    assert float(placement.min()) >= 0.0 and float(placement.max()) <= 1.0 and len(set(placement.tolist())) == 12
    args = (h, pred, target, model.means.detach().float(), model.log_weights, margin)
    near, far = counterfactual_h(*args, mode="boundary"), counterfactual_h(*args, mode="translate")
    assert not torch.allclose(near, far)
    assert torch.allclose(h_cf, near + placement[:, None] * (far - near), atol=1e-5)


@pytest.mark.parametrize("size", [16, 32])
def test_critic_families_learn_from_galaxies_and_are_frozen_on_counterfactuals(size):
    """loss.cf_critic_family: "both" adds residual critics (luminance and colour) to the
    plain ones; each learns from real galaxies (critic_real terms, gradients in its own
    weights), is frozen on x_cf (its cf term moves the decoder only) and weighs
    cf_critic / cf_critic_colour. "residual" replaces the plain ones; anything else is
    refused with the key named."""
    from galcf_hpc.model.critic import LuminanceCritic, ResidualCritic
    from galcf_hpc.train.objective import consistency_loss

    def build(family, **loss):
        cfg = config_from_dict(
            {
                "data": {"image_size": size},
                "model": {"channels": [8, 16]},
                "loss": {
                    "perceptual": 0.0,
                    "cf_critic": 1.0,
                    "cf_critic_colour": 0.5,
                    "cf_critic_family": family,
                    **loss,
                },
            }
        )
        return cfg, GalaxyCF.from_config(cfg).train()

    cfg, model = build("both")
    critics = model.critics(cfg.loss)
    assert [(n, type(c).__name__, w) for n, c, w in critics] == [
        ("critic", "LuminanceCritic", 1.0),
        ("colour_critic", "LuminanceCritic", 0.5),
        ("critic_residual", "ResidualCritic", 1.0),
        ("colour_critic_residual", "ResidualCritic", 0.5),
    ]
    images = torch.rand(6, 3, size, size)
    for _, critic, _ in critics:
        assert critic(images).shape == (6, NUM_CLASSES)
    # luminance critics see the band mean only: a recolouring that keeps it changes nothing
    grey = images.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    assert torch.allclose(model.critic_residual(images), model.critic_residual(grey), atol=1e-5)
    assert not torch.allclose(model.colour_critic_residual(images), model.colour_critic_residual(grey), atol=1e-5)

    total, terms = batch_losses(model, None, images, torch.arange(6) % NUM_CLASSES, cfg.loss, False)
    for key in ("critic_real", "colour_critic_real", "critic_residual_real", "colour_critic_residual_real"):
        assert key in terms and terms[key].item() > 0
    total.backward()
    for _, critic, _ in critics:
        assert all(p.grad is not None for p in critic.parameters())

    model.zero_grad(set_to_none=True)
    lat = model(images)
    terms = consistency_loss(model, lat.z.detach(), lat.h.detach(), lat.recon.detach(), cfg.loss)
    parts = [
        terms[k].item() for k in ("cf_critic", "cf_critic_colour", "cf_critic_residual", "cf_critic_colour_residual")
    ]
    assert all(p > 0 for p in parts)
    terms["cf"].backward()
    for _, critic, _ in critics:
        assert all(p.grad is None for p in critic.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.decoder.parameters())

    cfg, model = build("residual")
    assert isinstance(model.critic, ResidualCritic) and isinstance(model.colour_critic, ResidualCritic)
    assert model.critic_residual is None and len(model.critics(cfg.loss)) == 2
    cfg, model = build("plain")
    assert isinstance(model.critic, LuminanceCritic) and len(model.critics(cfg.loss)) == 2
    with pytest.raises(ConfigError, match="cf_critic_family"):
        build("resnet")


def critics_batch(images, labels, **loss):
    """One training batch (no counterfactuals) of a 16 px model with both critics and the
    given loss keys, from fixed seeds: (model, terms, gradient of every parameter)."""
    cfg = config_from_dict(
        {
            "data": {"image_size": 16},
            "model": {"channels": [8, 16]},
            "loss": {"perceptual": 0.0, "cf_critic": 1.0, "cf_critic_colour": 1.0, **loss},
        }
    )
    torch.manual_seed(1)
    model = GalaxyCF.from_config(cfg).train()
    torch.manual_seed(2)
    total, terms = batch_losses(model, None, images, labels, cfg.loss, False)
    total.backward()
    return model, terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_term_moves_only_encoder_and_decoder(grads, base_grads):
    """A term on x~ with frozen critics: the critics, flow and means get nothing from it,
    most encoder and decoder parameters do (a bias before a norm may not)."""
    for name, grad in grads.items():
        if "critic" in name or "flow" in name or "means" in name:
            assert torch.allclose(grad, base_grads[name], atol=1e-7), name
    for part in ("encoder.", "decoder."):
        moved = [n for n in grads if n.startswith(part) and not torch.allclose(grads[n], base_grads[n], atol=1e-6)]
        assert len(moved) > len([n for n in grads if n.startswith(part)]) // 2, part


def test_robust_critics_learn_from_attacked_galaxies(monkeypatch):
    """loss.cf_critic_robust: the critics learn from real galaxies moved by a one-step L2
    attack of that per-pixel radius: every image moves, by at most the ball's radius, in a
    direction that raises the critic's loss; the attack leaves the critic's weights without
    gradient and the critic_real term is computed on the attacked images."""
    import torch.nn.functional as F

    import galcf_hpc.train.objective as objective
    from galcf_hpc.model.critic import LuminanceCritic

    torch.manual_seed(0)
    critic = LuminanceCritic(16, NUM_CLASSES)
    x, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % NUM_CLASSES
    radius = 0.05
    moved = objective.attacked(critic, x, labels, radius)
    norms = (moved - x).flatten(1).norm(dim=1)
    ball = radius * (3 * 16 * 16) ** 0.5
    assert not moved.requires_grad and float(norms.min()) > 0.5 * ball and float(norms.max()) <= ball * (1 + 1e-5)
    assert all(p.grad is None for p in critic.parameters())
    noise = torch.randn_like(x)
    noise = x + ball * noise / noise.flatten(1).norm(dim=1)[:, None, None, None]
    with torch.no_grad():
        clean, worse, random = (F.cross_entropy(critic(v), labels, reduction="none") for v in (x, moved, noise))
    assert bool((worse > clean).all()) and float((worse - clean).mean()) > 3 * float((random - clean).abs().mean())

    calls = []
    real_attack = objective.attacked
    monkeypatch.setattr(objective, "attacked", lambda c, im, lb, r: calls.append(r) or real_attack(c, im, lb, r))

    _, plain, _ = critics_batch(x, labels, cf_critic_robust=0.0)
    _, robust, _ = critics_batch(x, labels, cf_critic_robust=0.1)
    assert calls == [0.1, 0.1]  # one attack per critic, none without the key
    for key in ("critic_real", "colour_critic_real"):
        assert float(robust[key]) > float(plain[key])
    with pytest.raises(ConfigError, match="cf_critic_robust"):
        config_from_dict({"loss": {"cf_critic_robust": -0.1}})


def test_reconstructions_must_keep_the_class_for_the_frozen_critics():
    """loss.rec_critic: the critics (frozen for this term) must read each galaxy's own class in
    its reconstruction x~; the term is each critic's cross-entropy on x~ times its weight, it
    moves encoder and decoder, never the critics, and it is refused without critics."""
    import torch.nn.functional as F

    images, labels = torch.rand(6, 3, 16, 16), torch.arange(6) % NUM_CLASSES
    model, terms, grads = critics_batch(images, labels, cf_critic_colour=0.5, rec_critic=2.0)
    _, plain, plain_grads = critics_batch(images, labels, cf_critic_colour=0.5, rec_critic=0.0)
    assert "rec_critic" not in plain
    with torch.no_grad():
        recon = model.decoder(model.encoder(images))
        expected = F.cross_entropy(model.critic(recon), labels)
        expected = expected + 0.5 * F.cross_entropy(model.colour_critic(recon), labels)
    assert abs(float(terms["rec_critic"]) - float(expected)) < 1e-5
    assert abs(float(terms["loss"]) - float(plain["loss"]) - 2.0 * float(expected)) < 1e-4
    assert_term_moves_only_encoder_and_decoder(grads, plain_grads)
    with pytest.raises(ConfigError, match="rec_critic"):
        config_from_dict({"loss": {"rec_critic": 1.0}})


def test_reconstructions_must_match_the_galaxy_in_the_critics_features():
    """loss.rec_features: a perceptual term in the frozen critics' stage features. The stages
    are the network's own (the plain critic's head on its last stage gives its logits), the
    distance of an image to itself is 0, a recolouring that keeps the band mean is invisible
    to a luminance critic and not to a colour one, the term in the objective is each critic's
    distance times its weight, it moves encoder and decoder, never the critics, and it is
    refused without critics."""
    from galcf_hpc.model.critic import LuminanceCritic, ResidualCritic
    from galcf_hpc.train.objective import feature_distance

    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    for family in (LuminanceCritic, ResidualCritic):
        critic = family(16, NUM_CLASSES)
        assert [tuple(f.shape[2:]) for f in critic(x, stages=True)] == [(8, 8), (4, 4)]
        assert float(feature_distance(critic, x, x)) < 1e-9
        assert 0.05 < float(feature_distance(critic, torch.rand_like(x), x)) <= 4.0
    plain = LuminanceCritic(16, NUM_CLASSES)
    assert torch.allclose(plain.head(plain(x, stages=True)[-1]), plain(x), atol=1e-6)
    swapped = x[:, [2, 0, 1]]  # the bands permuted: another colour, the same band mean
    assert float(feature_distance(plain, swapped, x)) < 1e-9
    assert float(feature_distance(LuminanceCritic(16, NUM_CLASSES, colour=True), swapped, x)) > 1e-3

    images, labels = torch.rand(6, 3, 16, 16), torch.arange(6) % NUM_CLASSES
    model, terms, grads = critics_batch(images, labels, cf_critic_colour=0.5, rec_features=3.0)
    _, base, base_grads = critics_batch(images, labels, cf_critic_colour=0.5)
    assert "rec_features" not in base
    with torch.no_grad():
        recon = model.decoder(model.encoder(images))
        expected = feature_distance(model.critic, recon, images) + 0.5 * feature_distance(
            model.colour_critic, recon, images
        )
    assert float(expected) > 0.01 and abs(float(terms["rec_features"]) - float(expected)) < 1e-5
    assert abs(float(terms["loss"]) - float(base["loss"]) - 3.0 * float(expected)) < 1e-4
    assert_term_moves_only_encoder_and_decoder(grads, base_grads)
    with pytest.raises(ConfigError, match="rec_features"):
        config_from_dict({"loss": {"rec_features": 1.0}})
