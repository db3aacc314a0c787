# speedrun of config/shakespeare_char.py on one GPU: the same data, model size and val loss target (1.4697, nanoGPT's
# best for this corpus), reached in far fewer steps with modded-nanogpt's architecture and the Muon optimizer.
# UNMEASURED: no GPU was available when this recipe was written; measure it side by side with the baseline:
#   python bench.py config/shakespeare_char_speedrun.py --vs config/shakespeare_char.py --runs=3
# and tune max_iters (the shortest schedule that still ends below the target wins).
# On a CPU, see config/shakespeare_char_cpu_speedrun.py.
out_dir = 'out-shakespeare-char-speedrun'
dataset = 'shakespeare_char'
target_val_loss = 1.4697  # stop as soon as an evaluation reaches nanoGPT's best val loss
eval_interval = 250  # the baseline's evaluation protocol, so the two val losses are measured alike
eval_iters = 200  # (each evaluation costs about as much as 130 training steps)
log_interval = 10
always_save_checkpoint = False

# the baseline's model and batch: 6 layers of 384, context 256, 64 x 256 tokens per step
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2  # this corpus is small: the best val loss is where overfitting starts, so keep the regularisation

# modded-nanogpt's architecture (records of Oct-Nov 2024): rotary positions, RMSNorm, QK-norm, ReLU^2, untied head,
# zero-initialised output projections, logit soft-capping
bias = False
position = 'rotary'
norm = 'rmsnorm'
qk_norm = True
activation = 'relu2'
tie_weights = False
zero_init_proj = True
logit_softcap = 30.0

# Muon for the blocks' matrices; AdamW (learning_rate) for embeddings, head and gains
optimizer = 'muon'
muon_lr = 0.02
learning_rate = 1e-2
beta2 = 0.99
max_iters = 2000  # Muon reached the CPU target in a quarter of the baseline's steps; 2000 of 5000 leaves margin
lr_decay_iters = 2000
warmup_iters = 50
min_lr = 1e-5
