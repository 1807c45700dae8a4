import copy
import logging

import pytest
import torch
from torch import nn

from fastcore_train import transfer
from fastcore_train.transfer import (GradualUnfreezer, discriminative_lrs, find_head, freeze,
                                     freeze_to, layer_groups, load_pretrained, replace_head,
                                     unfreeze)


class TinyResNet(nn.Module):
    """torchvision ResNet layout in miniature: conv1/bn1/relu, layerN blocks, avgpool, fc."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                    nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                                    nn.BatchNorm2d(16), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def numel(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def bns(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def bn_state(model):
    return [(b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone())
            for b in bns(model)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyResNet()


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


# --- freeze / unfreeze ------------------------------------------------------------------------

def test_freeze_default_keeps_head_and_bn_trainable(model):
    freeze(model)
    assert n_trainable(model) == numel(model.fc, *bns(model))
    model(X).sum().backward()
    assert model.conv1.weight.grad is None and model.layer1[0].weight.grad is None
    assert model.fc.weight.grad is not None and model.bn1.weight.grad is not None


def test_freeze_train_bn_false_freezes_bn_and_its_statistics(model):
    freeze(model, train_bn=False)
    assert n_trainable(model) == numel(model.fc)
    before = bn_state(model)
    model.train()
    assert model.training and model.fc.training
    assert not any(b.training for b in bns(model))
    out = model(X)
    for (m0, v0, n0), (m1, v1, n1) in zip(before, bn_state(model)):
        assert torch.equal(m0, m1) and torch.equal(v0, v1) and torch.equal(n0, n1)
    # the frozen BN normalises with its running statistics, as in eval mode
    reference = copy.deepcopy(model)
    nn.Module.train(reference, False)
    torch.testing.assert_close(out, reference(X), rtol=0, atol=0)


def test_freeze_train_bn_true_keeps_bn_in_train_mode(model):
    freeze(model, train_bn=True)
    before = bn_state(model)
    model.train()
    model(X)
    assert all(b.training for b in bns(model))
    assert all(not torch.equal(m0, m1) for (m0, _, _), (m1, _, _) in zip(before, bn_state(model)))


def test_unfreeze_restores_everything(model):
    freeze(model, train_bn=False)
    unfreeze(model)
    assert n_trainable(model) == numel(model)
    model.eval()
    model.train()
    assert all(b.training for b in bns(model))
    before = bn_state(model)
    model(X)
    assert not torch.equal(before[0][0], bn_state(model)[0][0])
    assert "train" not in model.bn1.__dict__


def test_frozen_bn_survives_deepcopy_and_refreeze(model):
    freeze(model, train_bn=False)
    clone = copy.deepcopy(model).train()
    assert not any(b.training for b in bns(clone))
    freeze(model, except_=model.layer2, train_bn=False)  # layer2's BN is no longer frozen
    model.train()
    assert model.layer2[1].training and not model.bn1.training and not model.layer1[1].training


def test_freeze_except(model):
    freeze(model, except_=(), train_bn=False)
    assert n_trainable(model) == 0
    freeze(model, except_=[model.layer2, model.fc], train_bn=False)
    assert n_trainable(model) == numel(model.layer2, model.fc)
    freeze(model, except_=model.fc.weight, train_bn=False)
    assert n_trainable(model) == model.fc.weight.numel()


def test_layer_groups_and_freeze_to(model):
    groups = layer_groups(model)
    assert [list(g) for g in groups] == [[model.conv1], [model.bn1], [model.layer1],
                                         [model.layer2], [model.fc]]
    g3 = layer_groups(model, 3)
    assert [list(g) for g in g3] == [[model.conv1, model.bn1], [model.layer1, model.layer2],
                                     [model.fc]]
    assert [list(g) for g in layer_groups(model, 1)] == [[model.conv1, model.bn1, model.layer1,
                                                         model.layer2, model.fc]]
    with pytest.raises(ValueError, match="between 1 and"):
        layer_groups(model, 6)

    freeze_to(model, 1, g3, train_bn=False)
    assert n_trainable(model) == numel(model.layer1, model.layer2, model.fc)
    freeze_to(model, 1, g3)  # train_bn=True: bn1 in the frozen group trains too
    assert n_trainable(model) == numel(model.layer1, model.layer2, model.fc, model.bn1)
    freeze_to(model, -1, train_bn=False)
    assert n_trainable(model) == numel(model.fc)
    freeze_to(model, 0, g3)
    assert n_trainable(model) == numel(model)


# --- heads -------------------------------------------------------------------------------------

def test_replace_head_resnet_style(model):
    old = model.fc
    new = replace_head(model, 5)
    assert model.fc is new and new is not old
    assert (new.in_features, new.out_features, new.bias is not None) == (16, 5, True)
    assert model(X).shape == (4, 5)
    assert all(p.requires_grad for p in new.parameters())


def test_replace_head_keeps_dtype_bias_and_sequential_classifier():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
            self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(12, 7, bias=False),
                                            nn.Identity())

        def forward(self, x):
            return self.classifier(self.features(x))

    net = Net().double()
    dropout = net.classifier[0]
    new = replace_head(net, 3)
    assert net.classifier[1] is new and net.classifier[0] is dropout
    assert new.bias is None and new.weight.dtype == torch.float64 and new.in_features == 12
    assert net(torch.randn(2, 6, dtype=torch.float64)).shape == (2, 3)


def test_replace_head_falls_back_to_last_linear():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8)])
            self.out = nn.Sequential(nn.GELU(), nn.Linear(8, 2))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.out(x)

    net = Custom()
    parent, name, layer = find_head(net)
    assert parent is net.out and name == "1" and layer is net.out[1]
    replace_head(net, 9)
    assert net(torch.randn(3, 4)).shape == (3, 9)
    assert net.blocks[1].out_features == 8
    with pytest.raises(ValueError, match="no nn.Linear head"):
        replace_head(nn.Sequential(nn.ReLU()), 2)


# --- discriminative learning rates -------------------------------------------------------------

def test_discriminative_lrs_geometric_and_trainable_only(model):
    groups = layer_groups(model, 3)
    pg = discriminative_lrs(model, slice(1e-5, 1e-3), groups)
    assert [g["lr"] for g in pg] == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-12)
    assert [{id(p) for p in g["params"]} for g in pg] == \
        [{id(p) for p in g.parameters()} for g in groups]
    torch.optim.AdamW(pg)  # torch rejects duplicated parameters

    freeze_to(model, 1, groups, train_bn=False)
    pg = discriminative_lrs(model, slice(1e-5, 1e-3), groups)
    assert [g["lr"] for g in pg] == pytest.approx([1e-4, 1e-3], rel=1e-12)
    assert sum(p.numel() for g in pg for p in g["params"]) == n_trainable(model)

    assert [g["lr"] for g in discriminative_lrs(model, 0.1, groups)] == [0.1, 0.1]
    # fastai's slice(lr): every group but the last at lr / 10 (Optimizer.set_hyper)
    unfreeze(model)
    assert [g["lr"] for g in discriminative_lrs(model, slice(2e-3), groups)] == \
        pytest.approx([2e-4, 2e-4, 2e-3], rel=1e-15)
    assert [g["lr"] for g in discriminative_lrs(model, slice(2e-3), groups[2:])] == [2e-3]
    with pytest.raises(ValueError, match="slice"):
        discriminative_lrs(model, slice(1e-3, None), groups)
    with pytest.raises(ValueError, match="3 layer groups"):
        discriminative_lrs(model, [1e-3, 1e-2], groups)


# --- load_pretrained ---------------------------------------------------------------------------

def test_load_pretrained_reports_and_loads_what_fits(tmp_path, caplog):
    torch.manual_seed(1)
    source = TinyResNet(10)
    target = TinyResNet(5)
    head_before = target.fc.weight.clone()
    conv_before = target.conv1.weight.clone()
    state = source.state_dict()
    del state["conv1.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)

    with caplog.at_level(logging.INFO, logger="fastcore_train.transfer"):
        report = load_pretrained(target, str(path))
    assert sorted(k for k, _, _ in report.mismatched) == ["fc.bias", "fc.weight"]
    assert ("fc.weight", (10, 16), (5, 16)) in report.mismatched
    assert report.missing == ["conv1.weight"]
    assert report.unexpected == ["extra.weight"]
    assert set(report.skipped) == {"fc.weight", "fc.bias", "extra.weight"}
    assert set(report.loaded) == set(state) - {"fc.weight", "fc.bias", "extra.weight"}
    assert "fc.weight" in caplog.text and "conv1.weight" in caplog.text
    for k in report.loaded:
        torch.testing.assert_close(target.state_dict()[k], state[k], rtol=0, atol=0)
    assert torch.equal(target.fc.weight, head_before)
    assert torch.equal(target.conv1.weight, conv_before)

    with pytest.raises(RuntimeError, match="fc.weight"):
        load_pretrained(TinyResNet(5), state, skip_mismatched=False)


def test_load_pretrained_strips_ddp_prefix():
    source, target = TinyResNet(10), TinyResNet(10)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    report = load_pretrained(target, state)
    assert not report.missing and not report.unexpected and not report.mismatched
    torch.testing.assert_close(target.fc.weight, source.fc.weight, rtol=0, atol=0)


# --- gradual unfreezing ------------------------------------------------------------------------

def _train_step(model, opt):
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()


def test_gradual_unfreezer_keeps_optimizer_state(model):
    groups = layer_groups(model, 3)
    opt = torch.optim.AdamW(model.fc.parameters(), lr=1e-2)
    unf = GradualUnfreezer(model, opt, groups, lrs=slice(1e-4, 1e-2), train_bn=False)
    assert n_trainable(model) == numel(model.fc)
    assert len(opt.param_groups) == 1

    _train_step(model, opt)
    saved = {k: v.clone() for k, v in opt.state[model.fc.weight].items()}
    body_before = model.conv1.weight.clone()

    assert unf.step() == 1
    assert n_trainable(model) == numel(model.layer1, model.layer2, model.fc)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in groups[1].parameters()}
    for k, v in saved.items():  # untouched by add_param_group
        assert torch.equal(opt.state[model.fc.weight][k], v)

    _train_step(model, opt)
    assert float(opt.state[model.fc.weight]["step"]) == 2  # continued, not restarted
    assert float(opt.state[model.layer1[0].weight]["step"]) == 1
    assert torch.equal(model.conv1.weight, body_before)  # still frozen

    unf.on_epoch_end(1, {})
    assert n_trainable(model) == numel(model) and len(opt.param_groups) == 3
    assert opt.param_groups[2]["lr"] == pytest.approx(1e-4)
    assert unf.step() is None and len(opt.param_groups) == 3
    model.train()
    assert all(b.training for b in bns(model))


def test_gradual_unfreezer_adds_trainable_bn_of_frozen_groups(model):
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.1, momentum=0.9)
    GradualUnfreezer(model, opt, layer_groups(model, 3))  # train_bn=True
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.bn1.weight) in in_opt


def test_all_public_names_documented():
    for name in transfer.__all__:
        assert getattr(transfer, name).__doc__, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_pretrained_refreshes_master_weights(backend, dtype):
    from fastcore_train.optim import FusedAdamW

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    pretrained = {k: torch.randn(v.shape).to(dtype)
                  for k, v in nn.Sequential(nn.Linear(6, 8), nn.ReLU(),
                                            nn.Linear(8, 3)).state_dict().items()}
    opt = FusedAdamW(model.parameters(), lr=0.05)
    for _ in range(2):  # the masters exist
        for p in model.parameters():
            p.grad = torch.randn(p.shape).to(dtype)
        opt.step()
    transfer.load_pretrained(model, pretrained, optimizer=opt)
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, pretrained[k])


# ---- bad checkpoints: one sentence each (issue 13.9) -------------------------------------------

@pytest.mark.parametrize("state,exc,msg", [
    (torch.zeros(3), TypeError, "expected a state dict .* got Tensor"),
    ([torch.zeros(3)], TypeError, "expected a state dict .* got list"),
    ({"0.weight": torch.zeros(2, 2), "0.bias": [1.0, 2.0]}, TypeError,
     "the value of '0.bias' is a list, not a tensor"),
    ({"epoch": 3, "model": {"0.weight": torch.zeros(2)}}, ValueError,
     r"no tensors at its top level \(keys: epoch, model\); .* checkpoint\['model'\]"),
    ({"epoch": 3, "lr": 0.1}, ValueError, r"no tensors at its top level \(keys: epoch, lr\)$"),
])
def test_load_pretrained_refuses_what_is_not_a_state_dict(state, exc, msg):
    model = nn.Sequential(nn.Linear(2, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=msg):
        transfer.load_pretrained(model, state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_pretrained_refuses_a_saved_training_checkpoint(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 1, "model": model.state_dict()}, path)
    with pytest.raises(ValueError, match=r"pass checkpoint\['model'\]"):
        transfer.load_pretrained(model, path)
