"""3D neural cellular automata that grow and regenerate voxel structures: ``python -m cubecore.nca``.

``targets`` reads the structures (``.npy``, MagicaVoxel ``.vox``, Minecraft ``.nbt``), ``recipe`` holds the
training recipe of the published 3D NCAs (seed, sample pool, damage, loss, gradient normalisation), ``config``
the ``nca:`` section, ``trainer`` the trainer, ``model`` the trained model as a folder (``NcaModel``,
``from_pretrained``) and the weights a run starts from (``nca.init_from``), ``artefacts`` the converter of the
upstream's pretrained models and ``__main__`` the command.
"""

from .targets import VoxelTarget, load_target, structure_names

__all__ = ["VoxelTarget", "load_target", "structure_names"]
