"""Adapters that plug moerm reward systems into RLHF trainers (TRL; OpenRLHF talks to `moerm serve` directly)."""
