"""Hugging Face reward models in and out.

    hf_import.py  `moerm import-hf`: an AutoModelForSequenceClassification RM -> a baseline run that keeps its head
    hf_export.py  `moerm export`: a baseline / baselora run (or one RODOS domain RM) -> a folder transformers loads
    modeling_moerm_reward.py  the modeling code an export carries when no stock HF class reproduces the rewards
"""
