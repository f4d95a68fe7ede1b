"""Adapters that plug moerm reward systems into RLHF trainers: TRL (`trl.py`), verl (`verl.py`); OpenRLHF talks to
`moerm serve` directly. `client.py` scores through a run loaded here or a server's URL, for both;
`conversation.py` turns chat messages into the plain prompt text a reward system reads."""
