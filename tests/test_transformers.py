"""GSNRTrainerCallback in a Hugging Face Trainer: schedule, metrics through Trainer.log, default loss, exactness."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gsnr_diag import Trajectory, gradient_stats  # noqa: E402
from gsnr_diag.integrations.transformers import GSNRTrainerCallback, LabelledBatches, model_loss  # noqa: E402


def _bert(num_labels=3):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=num_labels,
    )
    return transformers.BertForSequenceClassification(config)


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def _batch(n=24, T=8, vocab=50, num_labels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, vocab, (n, T), generator=g),
        "attention_mask": torch.ones(n, T, dtype=torch.long),
        "labels": torch.randint(0, num_labels, (n,), generator=g),
    }


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(self.batch["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


class Reporter(transformers.TrainerCallback):
    """Stands for a built-in reporter: it runs before user callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs or {})))


def _args(tmp_path, max_steps=4):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=100,
        disable_tqdm=True,
        seed=0,
    )


def test_records_and_metrics_reach_the_reporters(tmp_path):
    batch = _batch()
    model = _bert()
    reporter = Reporter()
    cb = GSNRTrainerCallback(batch, every=2, path=tmp_path / "g.jsonl", batch_size=12)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path), train_dataset=DictDataset(batch), callbacks=[reporter, cb]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert [s.step for s in cb.trajectory.snapshots] == [0, 2, 4]
    seen = [(step, m) for step, m in reporter.logs if "gsnr/mean_gsnr" in m]
    assert [step for step, _ in seen] == [0, 2, 4]  # the earlier callback got every snapshot
    for key in ("gsnr/mean_gsnr", "gsnr/osgr", "gsnr/same_sign", "gsnr/noise_scale", "gsnr/train_loss"):
        assert key in seen[-1][1]
    assert any("gsnr/osgr" in row for row in trainer.state.log_history)
    assert Trajectory.load(tmp_path / "g.jsonl").snapshots[-1].step == 4
    # the last snapshot is exact at the final weights, with the model's own per-sample loss
    stats = gradient_stats(model, LabelledBatches(batch, batch_size=12), model_loss(model))
    assert cb.trajectory.snapshots[-1].mean_gsnr == pytest.approx(stats.mean_gsnr, rel=1e-9)
    assert cb.trajectory.snapshots[-1].train_accuracy is not None


def test_training_is_untouched(tmp_path):
    batch = _batch()
    finals = []
    for callbacks in ([], [GSNRTrainerCallback(batch, every=1)]):
        model = _bert()
        trainer = transformers.Trainer(
            model=model, args=_args(tmp_path), train_dataset=DictDataset(batch), callbacks=callbacks
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        finals.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


def test_default_loss_is_the_models_own_per_sample():
    """Per sample, model_loss equals the model's outputs.loss on that sample alone; the batch value is their mean."""
    model = _gpt2().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (4, 7), generator=g)
    labels = ids.clone()
    labels[0, 5:] = -100  # unequal numbers of labelled tokens
    loss_fn = model_loss(model)
    with torch.no_grad():
        own = [float(model(input_ids=ids[i : i + 1], labels=labels[i : i + 1]).loss) for i in range(4)]
        ours = float(loss_fn(model(input_ids=ids), labels))
    assert ours == pytest.approx(sum(own) / 4, rel=1e-6)
    bert = _bert().eval()
    b = _batch(4)
    with torch.no_grad():
        x = {k: v for k, v in b.items() if k != "labels"}
        assert float(model_loss(bert)(bert(**x), b["labels"])) == pytest.approx(float(bert(**b).loss), rel=1e-6)


def test_a_causal_lm_is_measured(tmp_path):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 40, (12, 6), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model = _gpt2()
    cb = GSNRTrainerCallback(batch, every=2, batch_size=12)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, max_steps=2), train_dataset=DictDataset(batch), callbacks=[cb]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    snaps = cb.trajectory.snapshots
    assert [s.step for s in snaps] == [0, 2] and snaps[-1].mean_gsnr > 0 and snaps[-1].train_accuracy is None


def test_metrics_reach_the_built_in_tensorboard_reporter(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    batch = _batch()
    args = _args(tmp_path)
    args.report_to = ["tensorboard"]
    cb = GSNRTrainerCallback(batch, every=2, batch_size=12)
    trainer = transformers.Trainer(model=_bert(), args=args, train_dataset=DictDataset(batch), callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tag = next(t for t in acc.Tags()["scalars"] if t.endswith("gsnr/mean_gsnr"))  # the reporter prefixes train/
    assert [e.step for e in acc.Scalars(tag)] == [0, 2, 4]
    assert [e.value for e in acc.Scalars(tag)] == pytest.approx([s.mean_gsnr for s in cb.trajectory.snapshots])


def test_attach_sets_the_trainer_explicitly(tmp_path):
    batch = _batch()
    cb = GSNRTrainerCallback(batch, every=4)
    trainer = transformers.Trainer(model=_bert(), args=_args(tmp_path), train_dataset=DictDataset(batch))
    assert cb.attach(trainer) is trainer and cb.trainer is trainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert [row["step"] for row in trainer.state.log_history if "gsnr/mean_gsnr" in row] == [0, 4]
