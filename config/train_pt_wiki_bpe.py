# a small GPT on Portuguese Wikipedia with its own 32k BPE; prepare the data first:
#   python prepare.py config/prepare_pt_wiki_bpe.py
#   python train.py config/train_pt_wiki_bpe.py
# the tokenizer comes from the dataset: sample.py and eval.py read it from the checkpoint

out_dir = 'out-pt-wiki-bpe'
dataset = 'pt_wiki_bpe'
eval_interval = 1000
eval_iters = 100
log_interval = 10

# 64 x 1024 tokens per step
batch_size = 16
gradient_accumulation_steps = 4
block_size = 1024

n_layer = 8
n_head = 8
n_embd = 512
position = 'rotary'
norm = 'rmsnorm'

learning_rate = 1e-3
max_iters = 20000
lr_decay_iters = 20000
min_lr = 1e-4
warmup_iters = 500
