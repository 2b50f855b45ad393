"""`Trainer.hyperparameter_search` on Ray Tune: trials on warm Ray Train worker groups, ASHA/PBT mid-training."""
