"""Catalogue entries: Schedule-free and parameter-free methods:
Schedule-Free AdamW/SGD, Prodigy, D-Adapt Adam, DoG/LDoG, MoMo/MoMo-Adam."""

from llmvalley.optim.catalogue.entry import Entry, Paper

_SF = Paper("The Road Less Scheduled (Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky)",
            "2405.15682", 2024)
_DOG = Paper("DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule "
             "(Ivgi, Hinder, Carmon)", "2302.12022", 2023)
_MOMO = Paper("MoMo: Momentum Models for Adaptive Learning Rates (Schaipp, Ohana, Eickenberg, "
              "Defazio, Gower; ICML 2024)", "2305.07583", 2023)
_GROUPS = ("Group-level statistics (d, its numerator and denominator sums) are per parameter "
           "group here, kept as float slots copied in every tensor's state; the reference "
           "shares one set across all groups of the optimizer (identical with one group, which "
           "is how it is tested; create_optimizer's decay/no-decay split gives each group its "
           "own estimate).")

ENTRIES: dict[str, Entry] = {
    "schedulefree_adamw": Entry(
        family="schedule-free",
        paper=_SF,
        reference="facebookresearch/schedule_free; schedulefree 1.4.1 AdamWScheduleFree "
                  "(tested against, train and eval iterates)",
        weight_decay="at y: wd*y is added to the RMS-normalised gradient (so it enters both "
                     "the z step and the y interpolation), as the reference",
        notes=("Call optimizer.train() before training steps and optimizer.eval() before "
               "evaluating or saving (parameters then hold x). The optimizer starts in train "
               "mode (the reference starts in eval mode and needs train() first; both hold y "
               "before the first step). k, lr_max and weight_sum are per tensor (equal for "
               "tensors that step together); the reference keeps them per group and counts "
               "steps of tensors without a gradient too. z is an 'exact' slot (never "
               "quantised)."),
    ),
    "schedulefree_sgd": Entry(
        family="schedule-free",
        paper=_SF,
        reference="facebookresearch/schedule_free; schedulefree 1.4.1 SGDScheduleFree "
                  "(tested against)",
        weight_decay="coupled at y (g += wd*y), as the reference",
        notes="As schedulefree_adamw (train()/eval(), starts in train mode).",
    ),
    "prodigy": Entry(
        family="parameter-free",
        paper=Paper("Prodigy: An Expeditiously Adaptive Parameter-Free Learner (Mishchenko, "
                    "Defazio)", "2306.06101", 2023),
        reference="konstmish/prodigy; prodigyopt 1.1.2 (tested against)",
        weight_decay="decoupled, p *= 1 - d*lr*bc*wd before the update (decouple=True, "
                     "default); decouple=False: coupled L2",
        notes=("Adam's moments are ScaleByAdam's without its bias correction "
               "(debias=False: m / (sqrt(v) + d eps), as the reference; the correction is in "
               "dlr with use_bias_correction). " + _GROUPS + " lr is the "
               "group's own (the reference takes the largest lr of all groups and refuses "
               "others than it or 0). p0 is stored in full even for an all-zero tensor (the "
               "reference stores a 0-d zero); with betas[0]=0 the exp_avg slot is kept. "
               "fsdp_in_use is not offered (no sharded all-reduce of the statistics).")
    ),
    "dadapt_adam": Entry(
        family="parameter-free",
        paper=Paper("Learning-Rate-Free Learning by D-Adaptation (Defazio, Mishchenko)",
                    "2301.07733", 2023),
        reference="facebookresearch/dadaptation; dadaptation 3.2 DAdaptAdam (tested against)",
        weight_decay="coupled L2 (decouple=False, the reference default); decouple=True: "
                     "p *= 1 - d*lr*bc*wd before the update",
        notes=("Moments kept in the D-Adapt transform (dlr-weighted first moment, no bias "
               "correction, pre-update second moment in the numerator). " + _GROUPS +
               " layer_scale is a hyperparameter (a group key in the reference). log_every "
               "and fsdp_in_use are not offered.")
    ),
    "dog": Entry(
        family="parameter-free",
        paper=_DOG,
        reference="formll/dog; dog-optimizer 1.0.3 DoG (tested against)",
        weight_decay="coupled L2 (g += wd*p), as the reference",
        notes=("rbar and G are float slots (per group, copied in every tensor); the reference "
               "keeps 0-d tensors in the parameter dtype, so float32 runs round differently. "
               "The paper recommends iterate averaging (the reference's PolynomialDecayAverager"
               "), which is not part of the optimizer."),
    ),
    "ldog": Entry(
        family="parameter-free",
        paper=_DOG,
        reference="formll/dog; dog-optimizer 1.0.3 LDoG (tested against)",
        weight_decay="coupled L2 (g += wd*p), as the reference",
        notes="Layer-wise DoG: rbar and G per tensor.",
    ),
    "momo": Entry(
        family="parameter-free",
        paper=_MOMO,
        reference="fabian-sp/MoMo momo/momo.py (tested against an independent reference from "
                  "its equations)",
        weight_decay="proximal, p /= 1 + lr*wd after the step, as the reference",
        notes=("Needs the loss: step(loss=loss) or step(closure). The EMA coefficient is "
               "named momentum (the reference's beta). loss_avg and lb are per group and "
               "checkpointed (the reference keeps them on the optimizer object, outside its "
               "state_dict, and sums its statistics over all groups)."),
    ),
    "momo_adam": Entry(
        family="parameter-free",
        paper=_MOMO,
        reference="fabian-sp/MoMo momo/momo_adam.py (tested against an independent reference "
                  "from its equations)",
        weight_decay="proximal, p /= 1 + lr*wd after the step (divide=True, default); "
                     "divide=False: p *= 1 - lr*wd before it",
        notes=("Needs the loss: step(loss=loss). Adam's second moment is ScaleByAdam's. "
               "loss_avg and lb are per group and checkpointed (see momo)."),
    ),
}
