"""Tiny random transformers for the Fisher tests (no hub): BERT, GPT-2 and T5 with hidden 16, 2 layers, vocab 100."""
import torch
import transformers

VOCAB, PAD = 100, 0


def bert(num_labels=3, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32, num_labels=num_labels,
                                  pad_token_id=PAD)
    return transformers.BertForSequenceClassification(cfg).to(dtype).eval()


def _gpt2_cfg(**kw):
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                   pad_token_id=PAD, **kw)


def gpt2_classifier(num_labels=3, dtype=torch.float64):
    torch.manual_seed(1)
    return transformers.GPT2ForSequenceClassification(_gpt2_cfg(num_labels=num_labels)).to(dtype).eval()


def gpt2_lm(dtype=torch.float64):
    torch.manual_seed(2)
    return transformers.GPT2LMHeadModel(_gpt2_cfg()).to(dtype).eval()


def t5(dtype=torch.float64):
    torch.manual_seed(3)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2,
                                relative_attention_num_buckets=8, pad_token_id=PAD, decoder_start_token_id=PAD)
    return transformers.T5ForConditionalGeneration(cfg).to(dtype).eval()


def padded_ids(lengths, width, seed=0):
    """Token ids in [1, VOCAB) right-padded with PAD, and the attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=gen)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask
