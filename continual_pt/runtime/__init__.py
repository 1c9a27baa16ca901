"""What a process needs to run: process groups under every launcher, DeepSpeed's op builds and shared-memory
buffers, the host allocator, host copies of device values, and the engine's useless work left out."""
