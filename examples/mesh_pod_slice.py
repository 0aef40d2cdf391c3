"""Generation and evaluation data-parallel over every device: one host's GPUs, or every host of a pod slice.

    python examples/mesh_pod_slice.py                      # the devices of this host
    python examples/mesh_pod_slice.py --distributed        # on each host of a TPU pod slice / GPU cluster

With ``--distributed`` every host runs this same script; ``jax.distributed.initialize()`` finds the others
(on Cloud TPU and SLURM without arguments). The mesh has maxdiffusion's axes (data, fsdp, tensor); the
prompts are split over data x fsdp, params placed by ``sharding.DEFAULT_RULES`` (replicated) or, with
``--fsdp N``, sharded over N devices. Every host gets every image. On a CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` gives four devices to try it.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import jax_erasepro as jep
from jax_erasepro import sharding
from jax_erasepro.evaluation import evaluate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    parser.add_argument("--fsdp", type=int, default=1, help="devices each param is sharded over")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--quick", action="store_true", help="2 steps, 1 image per prompt, no evaluation sets"
    )
    args = parser.parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()
    steps = 2 if args.quick else args.steps

    mesh = sharding.make_mesh(data=-1, fsdp=args.fsdp)
    rules = sharding.FSDP_RULES if args.fsdp > 1 else sharding.DEFAULT_RULES
    print(f"{jax.process_count()} host(s), {jax.device_count()} device(s), mesh {dict(mesh.shape)}")

    sd = jep.load_pretrained()
    prompts = ["zorbly", "a red circle", "a blue square", "quibbet on a gray background", "a yellow moon"]
    images = jep.generate(sd, prompts, num_inference_steps=steps, mesh=mesh, rules=rules)
    single = jep.generate(sd, prompts, num_inference_steps=steps)
    gap = int(np.abs(images.astype(int) - single.astype(int)).max())
    print(f"{len(images)} images on the mesh; largest pixel difference from one device: {gap}")

    erased, _ = jep.erase(sd, ["zorbly"], ["star"], preserve=["quibbet"])
    small = dict(prompts=["{}", "a picture of {}"], others=prompts[1:]) if args.quick else {}
    ev = evaluate(
        sd,
        erased,
        ["zorbly"],
        ["star"],
        mesh=mesh,
        images_per_prompt=1,
        num_inference_steps=steps,
        robustness=False,
        reference=False,
        cache=False,
        **small,
    )
    print(
        f"target rate {ev.summary['target_rate']['before']:.2f} -> {ev.summary['target_rate']['after']:.2f}"
    )
    return {"devices": jax.device_count(), "pixel_gap": gap, "target_rate": ev.summary["target_rate"]}


if __name__ == "__main__":
    main()
