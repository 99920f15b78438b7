"""The sbn-surgery command line: parse options, call one library function, render with rich."""
