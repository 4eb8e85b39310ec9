"""Compiling: the compiler interface and its Inductor and eager adaptors, and what a compile did."""
