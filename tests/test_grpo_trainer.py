"""The GRPO trainer and ``mlx-localnorm grpo``: files, exact resume, the LoRA reference,
saved adapters/models that mlx-lm loads, and one-line errors for bad input."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from mlx_localnorm import rl
from mlx_localnorm.rl.config import GRPOConfig
from mlx_localnorm.rl.trainer import GRPOTrainer, prompt_batch, step_seed
from mlx_localnorm.rl.warmup import warmup
from test_cli import assert_one_line_error, run_in_process

TINY_WARMUP = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "seq_len": 16,
               "batch_size": 4, "demonstrations": 200}
# Timings differ between runs; everything else in a metrics record must not.
TIMINGS = ("tokens_per_s", "rollout_tokens_per_s", "elapsed_s")
INPUTS = mx.array([[1, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model of the "add" task, warmed up for two steps (a directory mlx-lm loads)."""
    return warmup("add", tmp_path_factory.mktemp("warmup"), steps=2, overrides=TINY_WARMUP,
                  progress=False)


def config(base, out, **fields):
    return GRPOConfig(**{**dict(model=str(base), out_dir=str(out), task="add", steps=3,
                                group_size=4, prompts_per_step=2, max_tokens=4, eval_size=4,
                                eval_every=2, save_every=2, learning_rate=3e-2,
                                progress=False), **fields})


def weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def logits(model):
    return np.array(model(INPUTS))


# ---------------------------------------------------------------- the run's files


@pytest.mark.parametrize("temperature, same", [(1e-4, True), (20.0, False)])
def test_the_sampled_held_out_reward_samples_at_the_rollout_temperature(base, tmp_path,
                                                                        temperature, same):
    seen = []

    def spy(prompt, completion, **fields):
        seen.append(completion)
        return float(len(completion))

    # The step-0 evaluation: first the greedy completions, then the sampled ones. Near zero
    # temperature they are the greedy ones; at a high one, near uniform noise.
    trainer = GRPOTrainer(config(base, tmp_path / "run", temperature=temperature,
                                 eval_size=8), reward=spy)
    greedy, sampled = seen[:8], seen[8:]
    assert len(sampled) == 8 and (greedy == sampled) == same
    record = trainer.metrics.records[0]
    assert record["eval_reward_sampled"] == np.mean([len(c) for c in sampled])


def test_a_run_writes_metrics_plot_checkpoints_and_adapters(base, tmp_path):
    trainer = GRPOTrainer(config(base, tmp_path / "run", beta=0.1))
    summary = trainer.run()
    assert summary["step"] == 3 and not summary["interrupted"]
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert set(records[0]) == {"step", "eval_reward", "eval_reward_std", "eval_reward_sampled"}
    for r in records[1:]:
        for key in ("reward_mean", "reward_std", "kl", "clip_fraction", "completion_length",
                    "completion_length_std", "tokens_per_s", "rollout_tokens_per_s", "loss"):
            assert np.isfinite(r[key]), (key, r)
        assert 0 <= r["reward_mean"] <= 1 and 1 <= r["completion_length"] <= 4
        # 2 prompts x G=4 completions of completion_length tokens each, summed over steps
        assert r["tokens"] == sum(round(8 * q["completion_length"]) for q in records[1:]
                                  if q["step"] <= r["step"])
    assert ["eval_reward" in r for r in records] == [True, False, True, True]
    assert (tmp_path / "run/reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in sorted((tmp_path / "run/checkpoints").iterdir())] == [
        "step_0000002", "step_0000003"]
    saved = json.loads((tmp_path / "run/train_config.json").read_text())
    assert saved["task"] == "add" and saved["beta"] == 0.1


@pytest.mark.parametrize("mode", ["lora", "norms", "full"])
def test_the_trained_policy_loads_in_mlx_lm(base, tmp_path, mode):
    trainer = GRPOTrainer(config(base, tmp_path / "run", mode=mode, steps=1))
    trainer.run()
    if mode == "full":
        model, _ = load(str(tmp_path / "run/model"), trust_remote_code=True)
    else:
        model, _ = load(str(base), adapter_path=str(tmp_path / "run/adapters"),
                        trust_remote_code=True)
    base_model, _ = load(str(base), trust_remote_code=True)
    assert np.abs(logits(trainer.model) - logits(base_model)).max() > 1e-4  # it trained
    np.testing.assert_allclose(logits(model), logits(trainer.model), rtol=1e-5, atol=1e-5)


def test_lora_leaves_the_reference_unchanged(base, tmp_path):
    trainer = GRPOTrainer(config(base, tmp_path / "run", beta=0.1))
    trainer.run()
    base_model, _ = load(str(base), trust_remote_code=True)
    assert np.abs(logits(trainer.model) - logits(base_model)).max() > 1e-4
    with rl.adapters_off(trainer.model):
        np.testing.assert_array_equal(logits(trainer.model), logits(base_model))


def test_full_weights_take_the_kl_to_a_frozen_copy(base, tmp_path):
    trainer = GRPOTrainer(config(base, tmp_path / "run", mode="full", beta=0.1))
    trainer.run()
    base_model, _ = load(str(base), trust_remote_code=True)
    assert np.abs(logits(trainer.model) - logits(base_model)).max() > 1e-4
    np.testing.assert_array_equal(logits(trainer.reference), logits(base_model))
    kls = [r["kl"] for r in trainer.metrics.records if "kl" in r]
    assert len(kls) == 3 and kls[0] == 0.0 and kls[-1] > 0.0


# ---------------------------------------------------------------- exact resume


def test_a_resumed_run_repeats_the_uninterrupted_run(base, tmp_path):
    whole = GRPOTrainer(config(base, tmp_path / "whole", steps=4))
    whole.run()
    first = GRPOTrainer(config(base, tmp_path / "split", steps=4))
    assert first.run(until=2)["interrupted"]
    del first
    mx.random.seed(1234)  # whatever the global RNG holds, the resumed steps must not see it
    second = GRPOTrainer(config(base, tmp_path / "split", steps=4), resume=True)
    assert second.step == 2
    second.run()
    a = without_timings(whole.metrics.records)
    b = without_timings(second.metrics.records)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4] and a == b
    assert len({r["reward_mean"] for r in a[1:]} | {r["loss"] for r in a[1:]}) > 2
    wa, wb = weights(whole.model), weights(second.model)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_each_step_has_its_own_prompts_and_seed(base, tmp_path):
    trainer = GRPOTrainer(config(base, tmp_path / "run"))
    assert trainer.batch(0) == trainer.batch(0) and trainer.batch(0) != trainer.batch(1)
    assert len(trainer.batch(5)) == 2
    assert all(r["prompt"].endswith("=") for r in trainer.batch(3))
    seeds = {step_seed(seed, step) for seed in range(3) for step in range(50)}
    assert len(seeds) == 150  # seed + step would collide (seed 1, step 0 = seed 0, step 1)


def test_step_s_trains_on_the_prompts_of_seed_s(base, tmp_path, monkeypatch):
    from mlx_localnorm.rl import trainer as module

    seen, original = [], module.grpo_step

    def spy(model, optimizer, tokenizer, records, *args, **kwargs):
        seen.append([r["prompt"] for r in records])
        return original(model, optimizer, tokenizer, records, *args, **kwargs)

    monkeypatch.setattr(module, "grpo_step", spy)
    GRPOTrainer(config(base, tmp_path / "run", seed=7)).run()
    assert seen == [[r["prompt"] for r in rl.tasks.make_prompts("add", 2, seed=step_seed(7, s))]
                    for s in range(3)]


def test_prompt_batches_go_through_each_epoch_in_a_seeded_order():
    records = [{"prompt": str(i)} for i in range(5)]
    served = [r["prompt"] for step in range(5) for r in prompt_batch(records, step, 2, seed=0)]
    assert sorted(served[:5]) == sorted(served[5:10]) == [str(i) for i in range(5)]
    assert served[:5] != served[5:10] or served[:5] != sorted(served[:5])
    assert prompt_batch(records, 3, 2, seed=0) == prompt_batch(records, 3, 2, seed=0)
    orders = {tuple(r["prompt"] for r in prompt_batch(records, 0, 5, seed=s)) for s in range(6)}
    assert len(orders) > 1


# ---------------------------------------------------------------- the warm-up


def test_the_warmup_model_is_character_level_and_stops_after_its_answer(base):
    model, tokenizer = load(str(base), trust_remote_code=True)
    text = "12+34= 46\n"
    ids = tokenizer.encode(text)
    # <s>, sentencepiece's leading "▁", then one token per character
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 2 + len(text)
    assert tokenizer.eos_token_ids == {2}
    docs = [json.loads(line)["text"] for line in (base / "demonstrations.jsonl").open()]
    assert len(docs) == 200 and all(d.endswith("\n") and "=" in d for d in docs)
    prompts = {r["prompt"] for r in rl.tasks.make_prompts("add", 50, seed=0, split="test")}
    assert not prompts & {d.split(" ")[0] for d in docs}  # held-out prompts never trained on


# ---------------------------------------------------------------- the command


def grpo(capsys, base, tmp_path, *flags):
    return run_in_process(capsys, "grpo", "--model", base, "--out-dir", tmp_path / "run",
                          "--steps", 1, "--group-size", 2, "--prompts-per-step", 1,
                          "--max-tokens", 3, "--no-progress", *flags)


def write(path, text):
    path.write_text(text)
    return path


REWARDS = """
def boom(prompt, completion, **fields):
    raise KeyError("no such key")

def nan(prompt, completion, **fields):
    return float("nan")

def words(prompt, completion, **fields):
    return "high"

def share_of_ones(prompt, completion, **fields):
    return completion.count("1") / 3
"""


def test_the_command_trains_on_a_prompts_file_with_a_reward_file(capsys, base, tmp_path):
    rewards = write(tmp_path / "my_rewards.py", REWARDS)
    prompts = write(tmp_path / "prompts.jsonl",
                    '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    proc = grpo(capsys, base, tmp_path, "--prompts", prompts, "--reward",
                f"{rewards}:share_of_ones,mlx_localnorm.rl.tasks:answer_match",
                "--reward-weights", "1,0.5")
    assert proc.returncode == 0, proc.stderr
    assert "Done: step 1" in proc.stdout and "--adapter-path" in proc.stdout
    assert (tmp_path / "run/adapters/adapters.safetensors").is_file()
    proc = run_in_process(capsys, "grpo", "--out-dir", tmp_path / "run", "--resume",
                          "--steps", 2, "--no-progress")
    assert proc.returncode == 0 and "Done: step 2" in proc.stdout, proc.stderr


@pytest.mark.parametrize("function, names", [
    ("boom", ["my_rewards:boom", "KeyError", "prompt '1+1='"]),
    ("nan", ["my_rewards:nan", "returned nan", "prompt '1+1='"]),
    ("words", ["my_rewards:words", "returned 'high'", "number", "prompt '1+1='"]),
])
def test_a_bad_reward_ends_in_one_line_naming_function_and_prompt(capsys, base, tmp_path,
                                                                  function, names):
    rewards = write(tmp_path / "my_rewards.py", REWARDS)
    prompts = write(tmp_path / "prompts.jsonl", '{"prompt": "1+1="}\n')
    proc = grpo(capsys, base, tmp_path, "--prompts", prompts, "--reward",
                f"{rewards}:{function}")
    assert proc.returncode == 1
    assert_one_line_error(proc, *names)


@pytest.mark.parametrize("flags, status, names", [
    (["--task", "add", "--group-size", "1"], 2, ["group_size", ">= 2", "got 1"]),
    (["--task", "add", "--reward", "no_such_module_q:score"], 2,
     ["no_such_module_q:score", "cannot import"]),
    (["--task", "add", "--reward", "math:no_such_function"], 2,
     ["math:no_such_function", "no attribute"]),
    (["--task", "juggle"], 2, ["task", "'add'", "'juggle'"]),
    (["--task", "add", "--prompts", "p.jsonl"], 2, ["exactly one of task", "prompts"]),
    (["--prompts", "p.jsonl"], 2, ["prompts need a reward"]),
    (["--task", "add", "--reward-weights", "1,2"], 2, ["reward_weights", "1 comma-separated",
                                                      "'1,2'"]),
    (["--task", "add", "--mode", "norms", "--lora-dropout", "0.1"], 2, ["lora_dropout",
                                                                         "'norms'"]),
    (["--task", "add", "--temperature", "0"], 2, ["temperature", "positive", "got 0"]),
])
def test_bad_flags_end_in_one_line_before_any_work(capsys, base, tmp_path, flags, status, names):
    proc = grpo(capsys, base, tmp_path, *flags)
    assert proc.returncode == status
    assert_one_line_error(proc, *names)
    assert not (tmp_path / "run").exists()


def test_a_malformed_prompts_line_names_file_and_line(capsys, base, tmp_path):
    prompts = write(tmp_path / "prompts.jsonl", '{"prompt": "1+1="}\n{"prompt": 1+1=}\n')
    proc = grpo(capsys, base, tmp_path, "--prompts", prompts, "--reward",
                "mlx_localnorm.rl.tasks:answer_match")
    assert proc.returncode == 1
    assert_one_line_error(proc, f"{prompts}:2", "not a JSON object")


def test_a_missing_model_or_run_ends_in_one_line(capsys, base, tmp_path):
    proc = grpo(capsys, tmp_path / "nowhere", tmp_path, "--task", "add")
    assert proc.returncode == 1
    assert_one_line_error(proc, "nowhere", "does not exist")
    proc = run_in_process(capsys, "grpo", "--out-dir", tmp_path / "nothing", "--resume")
    assert proc.returncode == 2
    assert_one_line_error(proc, "--resume", "train_config.json")
