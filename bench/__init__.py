"""The measuring scripts. Run each from the kit's folder as a module, so that the kit's files and
grpo_math/ are importable: python -m bench.bench --help. Their figures are in BENCHMARKS.md.

    bench           GRPO step time, generation speed and memory of the two backends on one workload
    bench_worker    bench's child process: one backend, loaded and trained through the kit, timed
    bench_rewards   completions per second that each reward grades, on one CPU core
    bench_stop      what a stop string costs a generate() call: transformers' matcher at each call, or the kit's once
    learning_study  does GRPO make a real model better, with 4 agents or 1? arms x seeds, scored before and after
    kept_adapter    which adapter a run keeps: the learning check's run, base, last and kept scored on 300 problems
    selection_power  the kept-adapter rules' two error rates (a gain thrown away, a loss shipped), simulated
    eval_cost       what a held-out evaluation costs: seconds per 100 questions, generate() by batch size and vLLM
    vllm_agreement  greedy answers from vLLM against generate()'s: the share that agree
    gpu_check       every part that needs a GPU, each in a child process with a time limit; --dry-run on a CPU
    gpu_plan        the GPU check's parts, their expected seconds, and how they fit calls and 15-minute loans
"""
