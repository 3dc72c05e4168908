"""The pipeline: the iterative prune / fine-tune loop (:mod:`.loop`), how it is fed (:mod:`.feeding`),
its run directory (:mod:`.run_dir`), plots and the final table."""
