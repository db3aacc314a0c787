# chat fine-tune of the CPU quickstart model (config/shakespeare_char_cpu.py) on a few Shakespeare questions and
# answers: the conversations get the model's characters plus the chat template's tokens, the loss is on the
# answers only (see the README's Chat fine-tuning). Architecture and tokenizer come from the base checkpoint.
#   python prepare_chat.py --input=data/shakespeare_qa/shakespeare_qa.jsonl --tokenizer_from=out-shakespeare-char-cpu
#   python train.py config/finetune_chat_char.py
#   python sample.py --out_dir=out-chat-char --chat=True --temperature=0

out_dir = 'out-chat-char'
dataset = 'shakespeare_qa'
init_from = 'out-shakespeare-char-cpu'
eval_interval = 50
eval_iters = 5
log_interval = 10
always_save_checkpoint = False

device = 'cpu'
compile = False

gradient_accumulation_steps = 1
batch_size = 32
block_size = 64  # the base model's context

optimizer = 'muon'
muon_lr = 0.01
muon_momentum = 0.9
learning_rate = 3e-3  # AdamW's, for the embedding (and the template tokens' new rows), head and gains
beta2 = 0.99
max_iters = 300
lr_decay_iters = 300
min_lr = 1e-4
warmup_iters = 0
