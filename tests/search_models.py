"""Tiny float32 models and synthetic tasks for the search tests: a pretrained model and fine-tunes that are
perturbed copies (each with its own head size for BERT)."""
import os

import torch
import transformers

from pymerge.eval.tasks import Task
from tests.eval_fixtures import choice_examples, classification_examples
from tests.fisher_models import PAD, VOCAB


def _perturb(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def bert_cfg(num_labels):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=24, max_position_embeddings=32, num_labels=num_labels,
                                   pad_token_id=PAD)


def bert_zoo(labels=(3, 2)):
    """(pretrained BertModel, [fine-tuned BertForSequenceClassification], [Task]) with M = len(labels)."""
    torch.manual_seed(0)
    base = transformers.BertModel(bert_cfg(2), add_pooling_layer=True).eval()
    fts, tasks = [], []
    for i, c in enumerate(labels):
        torch.manual_seed(10 + i)
        ft = transformers.BertForSequenceClassification(bert_cfg(c))
        ft.bert.load_state_dict(base.state_dict())
        fts.append(_perturb(ft, 100 + i))
        tasks.append(Task(f"t{i}", classification_examples(10, c, seed=i), test=classification_examples(6, c, 50 + i),
                          batch_size=8, fisher_inputs=[{"input_ids": e["input_ids"]} for e in
                                                       classification_examples(4, c, seed=20 + i)]))
    return base, fts, tasks


def _copies(model_cls, cfg, seed, m, perturb_seed):
    """A pretrained model of model_cls(cfg) and m fine-tunes: perturbed copies of it."""
    torch.manual_seed(seed)
    base = model_cls(cfg).eval()
    fts = []
    for i in range(m):
        ft = model_cls(cfg)
        ft.load_state_dict(base.state_dict())
        fts.append(_perturb(ft, perturb_seed + i))
    return base, fts


def gpt2_zoo(m=2):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, pad_token_id=PAD,
                                  bos_token_id=1, eos_token_id=1)
    base, fts = _copies(transformers.GPT2LMHeadModel, cfg, 2, m, 200)
    tasks = [Task(f"mc{i}", choice_examples(6, 3, seed=i), kind="multiple_choice", batch_size=4) for i in range(m)]
    return base, fts, tasks


def t5_zoo(m=2):
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2,
                                relative_attention_num_buckets=8, pad_token_id=PAD, decoder_start_token_id=PAD)
    base, fts = _copies(transformers.T5ForConditionalGeneration, cfg, 3, m, 300)
    # label strings shared by the task (as the paper scores T5), given as token ids
    tasks = [Task(f"s2s{i}", choice_examples(6, 2, seed=i, per_example=False), kind="multiple_choice",
                  choices=[[5, 6, 1], [7, 1]], batch_size=4) for i in range(m)]
    return base, fts, tasks


class InlinePool:
    """A pool whose submit evaluates at once in this process (a finished Future): the batched ask / tell path of
    the search without worker processes."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut = Future()
        fut.set_result(fn(*args))
        return fut


def worker_probe():
    """Runs in a search worker (pymerge.search.workers): its process, its objective and its thread count.
    Here, not in a test module, so that a worker process can import it by name."""
    from pymerge.search import workers

    return os.getpid(), id(workers._WORKER), workers._WORKER.memory_needed, torch.get_num_threads()
