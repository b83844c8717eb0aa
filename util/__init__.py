"""Small pieces every layer may use (no project imports here)."""
