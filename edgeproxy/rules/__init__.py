"""Pure rules: no I/O, ``now`` passed in (house rule 2).

Routes and placeholders, client addresses, token buckets.
"""
