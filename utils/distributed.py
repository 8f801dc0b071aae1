"""Process-group set-up and the few collectives the trainer needs."""
import os
import socket

import torch
import torch.distributed as dist


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Start (or join) the process group; returns (rank, world_size, device).

    Launched by ``deepspeed``/``torchrun`` the environment names the group; a plain ``python train.py``
    runs as a group of one. The backend is DeepSpeed's choice for the accelerator (gloo on CPU, nccl on GPU).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(accelerator.device_name(local_rank))


def all_reduce_sums(sums, device):
    """Sum a dict of floats over all ranks (keys must be the same everywhere)."""
    if not sums:
        return {}
    keys = sorted(sums)
    t = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def add_sums(total, part):
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v
    return total


def barrier():
    if dist.is_initialized():
        dist.barrier()
