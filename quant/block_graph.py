"""Find reconstruction blocks by structure: a module whose traced graph is a residual or separable block.

`quant.blocks` knows the block classes of the zoo, timm and torchvision by name. A user's own block
(say a `BasicBlock` with a 1x1-conv + BN shortcut) is not among them; `structural_recipe` reads it
from its `torch.fx` graph instead and returns the same `(steps, shortcut, post_act)` the hand-written
recognisers do, so it becomes one `QuantBlock`. Accepted, on the module alone:

- residual: `x -> main -> add(main, shortcut(x)) -> [post act] -> out`, where `main` is a chain of
  1 to `MAX_MAIN_CONVS` `Conv2d`s, each followed by BN / activation modules or functional activations
  (`F.relu`, `torch.relu`, `x.relu()`, `F.silu`, ...), and the shortcut is `x` itself, a chain of
  conv / BN modules (`nn.Sequential` or not), or a module holding no conv or linear (option-A padding,
  pooling), reused as it is;
- separable: a chain of 2 to `MAX_MAIN_CONVS` convs without an add, one of them grouped (depthwise);
  a plain conv stack (a deep stem, a VGG stage) is not a block.

Anything else, or a graph that fails to trace, gives None (the per-layer fallback): gating
multiplies (SE), concatenations, attention, a conv or module called twice, a tensor used twice
inside the main path, an op outside the pattern. A module that only wraps one child (a stage
`nn.Sequential` holding a single block) is not a block itself, nor is a chain whose children are
blocks (a stage of separable blocks): the blocks are its children.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

#: convs a main path may hold (a bottleneck has 3); bigger containers are never one block
MAX_MAIN_CONVS = 4
#: convs a projection shortcut may hold
MAX_SHORTCUT_CONVS = 2

_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish)
_SKIP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
_SKIP_NAMES = ("DropPath", "DropBlock2d")  # timm's: identities in eval, as `quant.blocks` treats them
_ADDS = (operator.add, operator.iadd, torch.add)


def _leaky(node: fx.Node) -> nn.Module:
    slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
    return nn.LeakyReLU(float(slope))


def _gelu(node: fx.Node) -> nn.Module:
    return nn.GELU(approximate=node.kwargs.get("approximate", "none"))


#: functional activations and the module each becomes (in-place or not: the block's output is new)
_ACT_FUNCTIONS: dict[object, Callable[[fx.Node], nn.Module]] = {
    F.relu: lambda _n: nn.ReLU(),
    torch.relu: lambda _n: nn.ReLU(),
    torch.relu_: lambda _n: nn.ReLU(),
    F.relu6: lambda _n: nn.ReLU6(),
    F.leaky_relu: _leaky,
    F.silu: lambda _n: nn.SiLU(),
    F.gelu: _gelu,
    F.hardswish: lambda _n: nn.Hardswish(),
}
_ACT_METHODS: dict[str, Callable[[fx.Node], nn.Module]] = {
    "relu": lambda _n: nn.ReLU(),
    "relu_": lambda _n: nn.ReLU(),
}


def structural_recipe(module: nn.Module):
    """`(steps, shortcut, post_act)` for a module whose graph is a residual or separable block, else None.

    The modules returned are `module`'s own (BN folded to `nn.Identity` or not), in the shape
    `quant.blocks.QuantBlock` takes: `steps` a list of `(conv, act chain or None)`, `shortcut` a module
    (`nn.Identity` for an identity skip) or None without a skip, `post_act` the activation after the
    add or None.
    """
    n_weight = sum(isinstance(m, _WEIGHT_LAYERS) for m in module.modules())
    if n_weight < 1 or n_weight > MAX_MAIN_CONVS + MAX_SHORTCUT_CONVS:  # never trace a container
        return None
    try:
        graph = _Tracer().trace(module)
    except Exception:  # any code fx cannot follow: not a block we can read
        return None
    return _match(graph, module)


class _Tracer(fx.Tracer):
    """fx's tracer, with every module holding no conv or linear kept as one node (a padding shortcut,
    a custom activation) instead of being traced into; `nn.Sequential`s are still traced into."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if super().is_leaf_module(m, qualname):
            return True
        return not isinstance(m, nn.Sequential) and not any(
            isinstance(s, _WEIGHT_LAYERS) for s in m.modules()
        )


def _match(graph: fx.Graph, root: nn.Module):
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1]
    if len(inputs) != 1 or output.op != "output" or not isinstance(output.args[0], fx.Node):
        return None
    if any(
        n.op not in ("placeholder", "output", "call_module", "call_function", "call_method") for n in nodes
    ):
        return None  # get_attr: a parameter or buffer used directly
    stateful = [root.get_submodule(n.target) for n in nodes if n.op == "call_module"]
    stateful = [
        m for m in stateful if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None
    ]
    if len({id(m) for m in stateful}) != len(stateful):
        return None  # a conv or BN called twice (shared weights); a shared ReLU module is fine
    if _wraps_one_child(nodes):
        return None
    x = inputs[0]
    out = _skip_back(output.args[0], root)
    post_act = _act(out, root) if out is not None else None
    if post_act is not None:
        out = _skip_back(_single_input(out), root)
    if out is not None and _is_add(out):
        return _residual(out, x, root, post_act, n_nodes=len(nodes))
    if post_act is not None:  # a plain chain keeps its last activation in its last step
        out = output.args[0]
    chain = _chain_back(out, x, root)
    if chain is None or len(chain) + 2 != len(nodes):
        return None
    if any(structural_recipe(child) is not None for child in root.children()):
        return None  # a stage of separable blocks: each child is a block, not the whole
    steps = _steps(chain, root)
    if steps is None or not 2 <= len(steps) <= MAX_MAIN_CONVS or not any(c.groups > 1 for c, _ in steps):
        return None
    return steps, None, None


def _residual(add: fx.Node, x: fx.Node, root: nn.Module, post_act: nn.Module | None, n_nodes: int):
    if len(add.args) != 2 or add.kwargs or not all(isinstance(a, fx.Node) for a in add.args):
        return None
    a, b = add.args
    paths = [_chain_back(a, x, root), _chain_back(b, x, root)]
    if paths[0] is None or paths[1] is None:
        return None
    convs = [sum(_is_conv(n, root) for n in p) for p in paths]
    main, skip = (paths[0], paths[1]) if convs[0] >= convs[1] else (paths[1], paths[0])
    after_add = 1 + (post_act is not None)  # the add, the activation (skipped nodes counted below)
    counted = 2 + len(main) + len(skip) + after_add  # placeholder and output
    counted += _skipped_after(add, root)
    if counted != n_nodes:
        return None  # something else happens in the graph (a side branch, a reused tensor)
    steps = _steps(main, root)
    shortcut = _shortcut(skip, root)
    if not steps or shortcut is None or len(steps) > MAX_MAIN_CONVS:
        return None
    return steps, shortcut, post_act


def _skipped_after(add: fx.Node, root: nn.Module) -> int:
    """Skipped (identity) nodes between the add and the output."""
    n, count = add, 0
    while len(n.users) == 1:
        n = next(iter(n.users))
        if n.op == "output":
            break
        count += _is_skip(n, root)
    return count


def _chain_back(node: fx.Node, x: fx.Node, root: nn.Module) -> list[fx.Node] | None:
    """The nodes from `x` (excluded) to `node`, in order, if they form a single-input chain whose
    inner tensors are used only by the next node; None otherwise."""
    chain: list[fx.Node] = []
    while node is not x:
        if node.op not in ("call_module", "call_function", "call_method"):
            return None
        if chain and len(node.users) != 1:
            return None  # a tensor inside the chain is used elsewhere too
        prev = _single_input(node)
        if prev is None:
            return None
        chain.append(node)
        node = prev
    return chain[::-1]


def _single_input(node: fx.Node) -> fx.Node | None:
    """The only tensor `node` reads (other arguments must be constants), else None."""
    found = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    if len(found) != 1 or node.args[:1] != (found[0],):
        return None
    if any(isinstance(a, (list, tuple, dict)) for a in (*node.args, *node.kwargs.values())):
        return None  # nested arguments could hide tensors
    return found[0]


def _skip_back(node: fx.Node | None, root: nn.Module) -> fx.Node | None:
    """The first node at or before `node` that is not an identity (None if an identity reads no tensor)."""
    while node is not None and _is_skip(node, root) and len(node.users) == 1:
        node = _single_input(node)
    return node


def _module(node: fx.Node, root: nn.Module) -> nn.Module | None:
    return root.get_submodule(node.target) if node.op == "call_module" else None


def _is_conv(node: fx.Node, root: nn.Module) -> bool:
    return isinstance(_module(node, root), _WEIGHT_LAYERS)


def _is_skip(node: fx.Node, root: nn.Module) -> bool:
    m = _module(node, root)
    return m is not None and (isinstance(m, _SKIP_MODULES) or type(m).__name__ in _SKIP_NAMES)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target in ("add", "add_")


def _act(node: fx.Node, root: nn.Module) -> nn.Module | None:
    """The activation module `node` applies (its own, or a new one for a functional call), else None."""
    if node.op == "call_module":
        m = _module(node, root)
        return m if isinstance(m, _ACT_MODULES) else None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target](node)
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target](node)
    return None


def _steps(chain: list[fx.Node], root: nn.Module) -> list[tuple[nn.Conv2d, nn.Module | None]] | None:
    """Split a main path into `(conv, act chain)` steps: it must start with a conv, and only BN,
    activations and identities may follow each conv."""
    steps: list[tuple[nn.Conv2d, list[nn.Module]]] = []
    for node in chain:
        m = _module(node, root)
        if type(m) is nn.Conv2d:
            steps.append((m, []))
        elif isinstance(m, _WEIGHT_LAYERS) or not steps:
            return None  # a linear or other conv kind, or something before the first conv
        elif _is_skip(node, root):
            continue
        elif isinstance(m, nn.BatchNorm2d):
            steps[-1][1].append(m)
        else:
            act = _act(node, root)
            if act is None:
                return None
            steps[-1][1].append(act)
    return [(conv, _sequence(acts)) for conv, acts in steps]


def _shortcut(chain: list[fx.Node], root: nn.Module) -> nn.Module | None:
    """The shortcut as one module: `nn.Identity` for `x` itself, the submodule that holds exactly the
    chain (a `downsample` Sequential), else a new `nn.Sequential` of the chain's modules."""
    mods = [_module(n, root) for n in chain]
    if any(m is None for m in mods):
        return None  # a functional op on the skip path
    if sum(isinstance(m, _WEIGHT_LAYERS) for m in mods) > MAX_SHORTCUT_CONVS:
        return None
    if any(isinstance(m, _WEIGHT_LAYERS) and type(m) is not nn.Conv2d for m in mods):
        return None
    owner = _common_owner([str(n.target) for n in chain])
    if owner:
        held = root.get_submodule(owner)
        if isinstance(held, nn.Sequential) and list(held) == mods:
            return held
    kept = [m for n, m in zip(chain, mods) if not _is_skip(n, root)]
    return _sequence(kept) or nn.Identity()


def _common_owner(targets: list[str]) -> str:
    """The longest dotted prefix under which all `targets` live (excluding a lone target itself)."""
    if len(targets) < 2:
        return ""
    parts = [t.split(".")[:-1] for t in targets]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _sequence(mods: list[nn.Module]) -> nn.Module | None:
    """None, the one module, or an `nn.Sequential` of them (as `quant.blocks._chain` builds)."""
    kept = [m for m in mods if not isinstance(m, nn.Identity)]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else nn.Sequential(*kept)


def _wraps_one_child(nodes: list[fx.Node]) -> bool:
    """Whether every op of the graph runs inside one and the same direct child (a stage holding a
    single block, a wrapper): then that child is the block, not this module."""
    owners = set()
    for n in nodes:
        if n.op in ("placeholder", "output"):
            continue
        stack = n.meta.get("nn_module_stack")
        if not stack:
            return False  # an op of this module's own forward
        path = next(iter(stack.values()))[0]  # {key: (qualified path, type)}, outermost first
        owners.add(path.split(".")[0])
    return len(owners) == 1
