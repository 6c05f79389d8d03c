"""
Tiny models for the tests: the Hugging Face hub is out of reach here, so we build everything the
scripts load. A byte-level BPE tokenizer trained on a few GSM8K questions, with Qwen's special
tokens and a Qwen-style chat template; a random Qwen2ForCausalLM "expert" and a smaller random
"amateur", both saved with save_pretrained so the scripts load them like real models.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
GSM8K_FIXTURE = os.path.join(DATA, "gsm8k_train.jsonl")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(texts, vocab_size=400):
    """A byte-level BPE tokenizer like Qwen's, small enough to train in a blink."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size, hidden, layers, heads, seed, eos_ids):
    """A random Qwen2 model. A large init scale makes its next-token distributions peaked, as a
    trained model's are, so the expert and amateur disagree by a sizeable KL at some positions."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
                         initializer_range=0.5, tie_word_embeddings=False,
                         bos_token_id=eos_ids[0], eos_token_id=eos_ids[0])
    model = Qwen2ForCausalLM(config).eval()
    # Like a base model's generation_config.json: only <|endoftext|> as eos. Sampling settings too,
    # as instruct models ship them: our stages must ignore them and decode greedily.
    model.generation_config = GenerationConfig(bos_token_id=eos_ids[0], eos_token_id=eos_ids[0],
                                               do_sample=True, temperature=0.7, top_p=0.8,
                                               top_k=20, repetition_penalty=1.5)
    return model


def questions():
    with open(GSM8K_FIXTURE) as f:
        return [json.loads(line)["question"] for line in f]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"expert": dir, "amateur": dir, "other_tokenizer": dir}: two models sharing one tokenizer
    (their vocabularies padded to different sizes, as Qwen2.5-Math-7B and Qwen2.5-0.5B are), and a
    model whose tokenizer disagrees with theirs."""
    root = tmp_path_factory.mktemp("models")
    texts = questions()
    tok = build_tokenizer(texts)
    eos = [tok.convert_tokens_to_ids("<|endoftext|>")]
    paths = {}
    for name, vocab, hidden, layers, heads, seed in [("expert", len(tok) + 16, 64, 2, 4, 1),
                                                     ("amateur", len(tok) + 4, 32, 1, 2, 2)]:
        path = str(root / name)
        build_model(vocab, hidden, layers, heads, seed, eos).save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    other = build_tokenizer([t[::-1] for t in texts], vocab_size=380)
    path = str(root / "other_tokenizer")
    build_model(len(other), 32, 1, 2, 3, eos).save_pretrained(path)
    other.save_pretrained(path)
    paths["other_tokenizer"] = path
    return paths


def run_script(script, *args, cwd=None, check=True, timeout=600):
    """Run one of the stage scripts as a user would; return the CompletedProcess."""
    # One thread, as the runs in the test process and under torchrun: a stage's floats are the same
    # with the same threads per process (the expert's cached decoding rounds by thread count).
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_torchrun(script, *args, nproc=2, cwd=None, check=True, timeout=600):
    """Run a stage script under PyTorch's launcher with `nproc` processes on the CPU (Gloo), as
    `torchrun --standalone --nproc_per_node N script.py ...` does on a GPU machine."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        # the ranks' own output first (the launcher's report at the end only names the exit codes)
        report = proc.stderr.rfind("Traceback (most recent call last)", 0, proc.stderr.rfind("ChildFailedError"))
        ranks = proc.stderr[:report if report > 0 else len(proc.stderr)]
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{ranks[-6000:]}\n...\n{proc.stderr[-1500:]}")
    return proc


def pytest_configure(config):
    # peft on transformers 5 warns about a renamed method on every get_peft_model: not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:.*is_gradient_checkpointing.*:FutureWarning")
