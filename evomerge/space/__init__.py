"""Search spaces as data: a YAML file that says which merges a search may propose.

    space = load_space("search_spaces/zoo_demo.yaml")      # load: YAML, ${VAR}, layer count
    recipe = trial_recipe(space, trial)                     # genome: any optuna trial → recipe

``schema`` holds the frozen file format and its rules, ``genome`` the named parameter slots,
trial → recipe and recipe → start point, ``load`` the file reading.
"""

from evomerge.space.genome import (Slot, build_recipe, distributions, equal_params,
                                   params_from_recipe, slots, start_points, trial_recipe)
from evomerge.space.load import VAR, expand_vars, load_space, model_num_layers, parse_space
from evomerge.space.schema import (GENE_RULES, REST, SCORE, Budget, GeneRule, ModelEntry, Pruning,
                                   SearchParam, SearchSpace, SpaceError, StartPoint)

__all__ = ["GENE_RULES", "REST", "SCORE", "VAR", "Budget", "GeneRule", "ModelEntry", "Pruning",
           "SearchParam", "SearchSpace", "Slot", "SpaceError", "StartPoint", "build_recipe",
           "distributions", "equal_params", "expand_vars", "load_space", "model_num_layers",
           "params_from_recipe", "parse_space", "slots", "start_points", "trial_recipe"]
