"""Speculative decoding: proposers (runner side), verification (runner side) and the
controller that decides how many drafts each request verifies (scheduler side)."""
