"""DML: formula check against the composed golden fixture (methods/dml.pt: simultaneous and alternating
updates), cohort construction, evaluation hook and loss names."""

from __future__ import annotations

import pytest
import torch

import kdzoo
from kdzoo.errors import UserInputError
from kdzoo.methods.losses import kd_loss
from kdzoo.types import Batch, Progress, Stage
from tests.methods.golden_step import assert_loss, assert_student_grads, build_pair, run_step


@pytest.fixture(scope="module")
def dml_ref(golden_dir):
    return torch.load(golden_dir / "methods" / "dml.pt", weights_only=True)


@pytest.fixture(scope="module")
def net2_state(golden_dir):
    return torch.load(golden_dir / "models" / "resnet8x4.pt", weights_only=True)["state_dict"]


def _golden_cohort(common, net2_state):
    _, student = build_pair(common)  # net1 = the common student
    distiller = kdzoo.create_distiller("dml", student=student)
    distiller.peer1.load_state_dict(net2_state)
    return distiller


def _as_student_ref(grads, grads_head, grad_norms):
    return {"student_grads": grads, "student_grads_head": grads_head, "student_grad_norms": grad_norms,
            "fp64": {"zero_grads": []}}


def test_dml_simultaneous_matches_fixture(golden_common, dml_ref, net2_state):
    ref = dml_ref
    distiller = _golden_cohort(golden_common, net2_state)
    losses, total = run_step(distiller, golden_common)
    names = {"loss_ce": "net1.loss_ce", "loss_kl": "net1.loss_kl",
             "peer1.loss_ce": "net2.loss_ce", "peer1.loss_kl": "net2.loss_kl"}
    assert set(losses) == set(names)
    for ours, theirs in names.items():
        assert_loss(losses[ours], ref["loss_weights"][theirs] * ref["losses"][theirs])
    assert_loss(losses["loss_ce"] + losses["loss_kl"], ref["total_net1"])
    assert_loss(losses["peer1.loss_ce"] + losses["peer1.loss_kl"], ref["total_net2"])
    assert_loss(total, ref["total"])
    assert_student_grads(distiller.student, ref)
    assert_student_grads(distiller.peer1, _as_student_ref(ref["net2_grads"], ref["net2_grads_head"],
                                                          ref["net2_grad_norms"]))
    with torch.no_grad():  # train-mode BN: re-running gives the step's logits again
        torch.testing.assert_close(distiller.student(golden_common["images"]), ref["logits_net1"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(distiller.peer1(golden_common["images"]), ref["logits_net2"], rtol=1e-4, atol=1e-5)


def test_dml_alternating_matches_fixture(golden_common, dml_ref, net2_state):
    alt, hp = dml_ref["alternating"], dml_ref["hparams"]
    distiller = _golden_cohort(golden_common, net2_state)
    distiller.cfg.update = "alternating"
    assert distiller.performs_own_updates
    distiller.train()
    optimizer = torch.optim.SGD(distiller.param_groups(Stage())[0]["params"], lr=hp["alt_lr"],
                                momentum=hp["alt_momentum"], weight_decay=hp["alt_weight_decay"],
                                nesterov=bool(hp["alt_nesterov"]))
    peer_grads: list[dict[str, torch.Tensor]] = []

    def apply_update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        peer_grads.append({n: p.grad.clone() for n, p in distiller.peer1.named_parameters() if p.grad is not None})
        optimizer.step()

    batch = Batch(golden_common["images"], golden_common["labels"])
    logits, losses = distiller.update_step(batch, Progress(), apply_update)
    assert len(peer_grads) == 2 and not peer_grads[0]  # the student's update leaves the peer untouched
    assert_loss(losses["loss_ce"], dml_ref["losses"]["net1.loss_ce"])
    assert_loss(losses["loss_kl"], dml_ref["losses"]["net1.loss_kl"])
    assert_loss(losses["peer1.loss_ce"], alt["losses_net2"]["loss_ce"])
    assert_loss(losses["peer1.loss_kl"], alt["losses_net2"]["loss_kl"])
    assert_loss(losses["peer1.loss_ce"] + losses["peer1.loss_kl"], alt["total_net2"])
    torch.testing.assert_close(logits, dml_ref["logits_net1"], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(distiller.student(batch.image), alt["logits_net1_after_step"], rtol=1e-4, atol=1e-5)
    for name, p in distiller.peer1.named_parameters():
        p.grad = peer_grads[1][name]
    assert_student_grads(distiller.peer1, _as_student_ref(alt["net2_grads"], alt["net2_grads_head"],
                                                          alt["net2_grad_norms"]))
    with pytest.raises(RuntimeError, match="alternating"):
        distiller.training_step(batch, Progress())


def test_dml_cohort_construction_and_evaluation_models():
    torch.manual_seed(0)
    student = kdzoo.create_model("resnet8")
    distiller = kdzoo.create_distiller("dml", student=student)
    cfg = distiller.cfg
    assert (cfg.peers, cfg.temperature, cfg.ce_weight, cfg.kl_weight, cfg.update) == (["student"], 1.0, 1.0, 1.0,
                                                                                     "simultaneous")
    assert not type(distiller).requires_teacher and distiller.teacher is None
    peer = distiller.peer1
    assert type(peer) is type(student) and peer is not student
    # A fresh network of the same architecture, not a copy of the student's weights.
    assert not torch.equal(peer.conv1.weight, student.conv1.weight)
    assert distiller.evaluation_models() == {"student": student, "peer1": peer}
    assert distiller.num_extra_parameters() == sum(p.numel() for p in student.parameters())
    assert any(k.startswith("peer1.") for k in distiller.method_state_dict())
    trainable = {id(p) for p in distiller.trainable_parameters(Stage())}
    assert {id(p) for p in peer.parameters()} <= trainable and {id(p) for p in student.parameters()} <= trainable

    other = kdzoo.create_distiller("dml", student=kdzoo.create_model("resnet8"), peers=["resnet14", "student"])
    assert type(other.peer1).__name__ == type(student).__name__ and len(other.peer1.layer1) == 2
    assert set(other.evaluation_models()) == {"student", "peer1", "peer2"}
    with pytest.raises(UserInputError):
        kdzoo.create_distiller("dml", student=kdzoo.create_model("resnet8"), update="sometimes")
    with pytest.raises(UserInputError):
        kdzoo.create_distiller("dml", student=kdzoo.create_model("resnet8"), peers=[])


def test_dml_three_networks_average_the_kl():
    torch.manual_seed(0)
    distiller = kdzoo.create_distiller("dml", student=kdzoo.create_model("resnet8"), peers=["student", "student"],
                                       teacher=kdzoo.create_model("resnet8"))  # a teacher is accepted and ignored
    distiller.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    _, losses = distiller.training_step(Batch(images, labels), Progress())
    assert set(losses) == {"loss_ce", "loss_kl", "peer1.loss_ce", "peer1.loss_kl", "peer2.loss_ce", "peer2.loss_kl"}
    with torch.no_grad():
        z = [net(images) for net in distiller.evaluation_models().values()]
    for k, prefix in enumerate(("", "peer1.", "peer2.")):
        expected = sum(kd_loss(z[k], z[i], 1.0) for i in range(3) if i != k) / 2
        assert_loss(losses[f"{prefix}loss_kl"], expected)
    sum(losses.values()).backward()
    for name, p in distiller.named_parameters():
        if not name.startswith("teacher."):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in distiller.teacher.parameters())
