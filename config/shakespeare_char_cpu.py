# the character-level Shakespeare model for a CPU (a laptop, or 2 cores), in well under a minute:
# nanoGPT's CPU quickstart shape (4 layers, 4 heads, 128 wide, context 64) with the speedrun's recipe
# (see config/shakespeare_char_cpu_speedrun.py for why each choice): Muon, rotary positions, QK-norm,
# ReLU², an untied zero-initialised head and soft-capped logits. Big batches of 48 run faster per token
# on a CPU than nanoGPT's 12, and Muon needs 10x fewer steps than AdamW to get as far.
#   python data/shakespeare_char/prepare.py
#   python train.py config/shakespeare_char_cpu.py
#   python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:"

out_dir = 'out-shakespeare-char-cpu'
dataset = 'shakespeare_char'
eval_interval = 100
eval_iters = 5  # 5 batches of 48: the same 240 windows as nanoGPT's 20 batches of 12
log_interval = 20
always_save_checkpoint = False  # save when val loss improves

device = 'cpu'
compile = False  # compiling takes longer than this whole run

gradient_accumulation_steps = 1
batch_size = 48
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
position = 'rotary'
qk_norm = True
activation = 'relu2'
tie_weights = False
zero_init_proj = True
logit_softcap = 30.0

optimizer = 'muon'
muon_lr = 0.02
muon_momentum = 0.9
learning_rate = 1e-2  # AdamW's, for the embedding, head and gains
beta2 = 0.99
max_iters = 200
lr_decay_iters = 260  # stop while the learning rate is still ~20% of its peak: better than annealing to zero
min_lr = 1e-5
warmup_iters = 0
