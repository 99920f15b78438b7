"""study --from-study: the tool's own workflow as a second study. A trained none model, fine-tuned
further without SBN and, converted with identity init, with it, paired over the same seeds."""

from __future__ import annotations

import json

import pytest
import torch

from sbn_surgery.study import study

pytestmark = pytest.mark.usefixtures("one_thread")

# test_resnet is named by no recipe's models: patterns, so recipes are forced; output_stride 8
# keeps the SBN sites at 2x2 (a spectrum to measure) at 16x16
KW = {"output_stride": 8}
TINY = dict(subset=32, batch_size=16, input_size=(3, 16, 16), epochs=1, device="cpu", force=True,
            model_kwargs=KW)
CLI_TINY = ["--data", "digits", "--subset", "32", "--batch-size", "16", "--input-size", "3",
            "16", "16", "--epochs", "1", "--device", "cpu", "--force", "--model-kwargs",
            "output_stride=8"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A finished study on digits: none and resnet, seeds 0 and 1."""
    out = tmp_path_factory.mktemp("first") / "s"
    study("test_resnet", "digits", arms=["none", "resnet"], seeds=2, output=out, **TINY)
    return out


@pytest.mark.slow
def test_second_study_starts_every_arm_from_the_trained_none_model(first, run_cli, tmp_path,
                                                                    monkeypatch):
    from safetensors.torch import load_file

    import sbn_surgery.train as T

    starts = {}
    real = T.finetune

    def record(net, data, **kw):
        key = tuple(str(kw["output"]).split("/")[-2:])
        x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            starts[key] = ({n: t.detach().clone() for n, t in net.state_dict().items()},
                           net.eval()(x), dict(net.sbn_meta))
        net.train()
        return real(net, data, **kw)

    monkeypatch.setattr(T, "finetune", record)
    out = tmp_path / "second"
    res = run_cli("study", "test_resnet", *CLI_TINY, "--arms", "none,resnet", "--seeds", "2",
                  "--from-study", first, "-o", out, "--json")
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["from_study"] == str(first)
    for k in (0, 1):
        trained = load_file(str(first / "none" / f"seed{k}" / "best.safetensors"))
        none_state, none_out, _ = starts[("none", f"seed{k}")]
        sbn_state, sbn_out, meta = starts[("resnet", f"seed{k}")]
        assert trained.keys() == none_state.keys() < sbn_state.keys()  # SBN adds its own
        for name, value in trained.items():  # both arms start from the trained none model
            assert torch.equal(none_state[name], value), name
            assert torch.equal(sbn_state[name], value), name
        assert meta["init"] == "identity"
        torch.testing.assert_close(sbn_out, none_out, rtol=1e-4, atol=1e-4)  # same function
    # the seeds start from different trained models, so the pairing is not trivial
    assert not torch.equal(starts[("none", "seed0")][1], starts[("none", "seed1")][1])
    stored = json.loads((out / "study.json").read_text())["options"]
    assert stored["from_study"] == str(first) and stored["checkpoint"] is None
    entropy = [r["features"]["spectral_entropy"] for a in doc["arms"] for r in a["runs"]]
    assert all(0 < e <= 1 for e in entropy)  # 2x2 sites: a spectrum was measured
    again = run_cli("study", "test_resnet", *CLI_TINY, "--arms", "none,resnet", "--seeds", "2",
                    "-o", out)  # the same study without --from-study is another study
    assert again.code == 2 and "from_study" in again.stderr


@pytest.fixture
def fake_first(tmp_path):
    """What --from-study reads before anything trains: study.json and the none runs' weights."""
    from sbn_surgery.study.store import save_options

    out = tmp_path / "first"
    save_options(out, {"model": "test_resnet", "model_kwargs": KW, "seed": 0, "seeds": 2})
    for k in (0, 1):
        (out / "none" / f"seed{k}").mkdir(parents=True)
        (out / "none" / f"seed{k}" / "best.safetensors").write_bytes(b"")
    return out


def test_from_study_refuses_what_does_not_fit(fake_first, run_cli, tmp_path):
    first = fake_first
    base = ["study", "test_resnet", *CLI_TINY, "--arms", "none,resnet", "-o", tmp_path / "o"]
    cases = [
        (["--from-study", first, "--seed", "1"], "no ", "seed 2"),  # seeds 1, 2: 2 is missing
        (["--from-study", first, "--checkpoint", first / "none/seed0/best.safetensors"],
         "leave out --checkpoint", None),
        (["--from-study", tmp_path / "none"], "no study.json", None),
    ]
    for extra, words, more in cases:
        res = run_cli(*base, *extra)
        assert res.code == 2 and words in res.stderr, (extra, res.stderr)
        assert more is None or more in res.stderr
        assert res.stderr.strip().count("\n") == 0 and not (tmp_path / "o").exists()
    res = run_cli("study", "test_resnet", *CLI_TINY[:-2], "--arms", "none,resnet",
                  "--from-study", first, "-o", tmp_path / "o")
    assert res.code == 2 and "--model-kwargs" in res.stderr and "output_stride" in res.stderr
    res = run_cli("study", "resnet10t", *CLI_TINY, "--arms", "none,resnet", "--from-study",
                  first, "-o", tmp_path / "o")
    assert res.code == 2 and "trained 'test_resnet'" in res.stderr
