# a small GPT on Russian Wikipedia with Gemma 3's tokenizer; prepare the data first:
#   python prepare.py config/prepare_ru_wiki_gemma.py
#   python train.py config/train_ru_wiki_gemma.py
# the tokenizer comes from the dataset: sample.py and eval.py read it from the checkpoint

out_dir = 'out-ru-wiki-gemma'
dataset = 'ru_wiki_gemma'
eval_interval = 1000
eval_iters = 100
log_interval = 10

# 64 x 1024 tokens per step
batch_size = 16
gradient_accumulation_steps = 4
block_size = 1024

# 262,144 x 512 embedding (tied with the output head): 134M of the model's parameters are vocabulary
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
