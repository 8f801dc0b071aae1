"""Process-group set-up and the few collectives the trainer needs. torch is imported where it is used, so that
utils/launch.sh picks a free port (``free_port``) without paying for importing it."""
import os
import socket


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
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    else:
        unlink_shm_buffer()
    return dist.get_rank(), dist.get_world_size(), torch.device(accelerator.device_name(local_rank))


def shm_buffer_path(rank):
    """The shared-memory file DeepSpeed's CPU all-reduce (deepspeed_shm_comm, ops/csrc/cpu/comm/shm.cpp) creates for
    ``rank`` of this process group: 66 MB in /dev/shm (RAM) that DeepSpeed never unlinks."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def unlink_shm_buffer():
    """Remove this rank's DeepSpeed all-reduce buffer file once every rank has mapped every buffer (they map them
    all while the group starts; the barrier waits for that): the mappings live on until the processes exit, so a
    run that ends in any way leaves nothing behind (without this each CPU run leaked 66 MB of RAM per process)."""
    import torch.distributed as dist

    barrier()
    try:
        os.unlink(shm_buffer_path(dist.get_rank()))
    except FileNotFoundError:  # no shared-memory all-reduce in this DeepSpeed build, or ranks on several hosts
        pass


def all_reduce_sums(sums, device):
    """Sum a dict of floats over all ranks (keys must be the same everywhere)."""
    import torch
    import torch.distributed as dist

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
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
