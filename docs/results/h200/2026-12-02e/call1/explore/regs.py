"""Exploration: run model_roofline, then list every compiled Triton kernel's registers, spills, shared memory."""
import importlib, pkgutil, runpy, sys
import nexus_tune.engine.kernels as K
sys.argv = ["model_roofline.py"] + sys.argv[1:]
try:
    runpy.run_path("benchmarks/model_roofline.py", run_name="__main__")
except SystemExit as e:
    print("model_roofline exit", e.code)
print("\n=== compiled Triton kernels")
for m in pkgutil.iter_modules(K.__path__):
    mod = sys.modules.get(f"nexus_tune.engine.kernels.{m.name}") or importlib.import_module(f"nexus_tune.engine.kernels.{m.name}")
    for name, obj in vars(mod).items():
        caches = getattr(obj, "device_caches", None)
        if not caches or not name.startswith("_"):
            continue
        for dev, c in caches.items():
            for key, ck in c[0].items():
                w = ck.metadata.num_warps
                regs = ck.n_regs
                by_regs = 65536 // max(((regs * 32 + 255) // 256) * 256 * w, 1)
                by_smem = (233472 // ck.metadata.shared) if ck.metadata.shared else 99
                print(f"{m.name}.{name}: regs {regs} spills {ck.n_spills} warps {w} stages {getattr(ck.metadata,'num_stages','?')} "
                      f"shared {ck.metadata.shared} -> programs/SM regs {by_regs} smem {by_smem} | {str(key)[-200:]}")
